{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "forge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: <release>-<chart>, or <release> when the release name already contains the chart name.
*/}}
{{- define "forge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart label value: <chart>-<version>.
*/}}
{{- define "forge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels of every resource, without app.kubernetes.io/component (each template adds its own).
*/}}
{{- define "forge.baseLabels" -}}
helm.sh/chart: {{ include "forge.chart" . }}
app.kubernetes.io/name: {{ include "forge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: forge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Standard labels of the operator's resources (Deployment, ServiceAccount, RBAC, metrics Service).
*/}}
{{- define "forge.labels" -}}
{{ include "forge.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Selector labels of the operator (stable across upgrades: never add the version here).
*/}}
{{- define "forge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "forge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "forge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "forge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image reference.
*/}}
{{- define "forge.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/*
Default trainer image reference.
*/}}
{{- define "forge.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{/*
True ("true") when the operator watches every namespace.
*/}}
{{- define "forge.clusterWide" -}}
{{- if empty .Values.operator.watchNamespaces }}true{{- end }}
{{- end }}

{{/*
Whether the cluster serves a prometheus-operator kind: include "forge.hasMonitoringKind" (list . "ServiceMonitor").
*/}}
{{- define "forge.hasMonitoringKind" -}}
{{- $ctx := index . 0 }}
{{- $kind := index . 1 }}
{{- if $ctx.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind) }}true{{- end }}
{{- end }}

{{/*
Namespace-scoped rules of the operator (the same for a ClusterRole and for each per-namespace Role).
Keep in sync with operator/forge_operator/ (handlers and render): docs/monitoring.md lists why each verb is needed.
*/}}
{{- define "forge.namespacedRules" -}}
# Exactly the verbs of operator/forge_operator/permissions.py (tests/chart compares them).
# ForgeJobs: watched and annotated by kopf, read by the operator; the trainer Role the operator creates grants get
# on forgejobs and get/patch on forgejobs/status, so the operator must hold those itself (RBAC escalation check).
- apiGroups: ["forge.dev"]
  resources: ["forgejobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["forge.dev"]
  resources: ["forgejobs/status"]
  verbs: ["get", "patch"]
# Children carry ownerReferences with blockOwnerDeletion: clusters enforcing owner-reference permissions require this.
- apiGroups: ["forge.dev"]
  resources: ["forgejobs/finalizers"]
  verbs: ["update"]
# The child job each ForgeJob runs as, for each enabled backend (operator.backends): created, watched, patched
# (suspend, its forge.dev/final-status finalizer), deleted when a stalled run fails (spec.monitoring.onStall fail).
{{- if has "pytorchjob" .Values.operator.backends }}
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
{{- end }}
{{- if has "trainjob" .Values.operator.backends }}
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
{{- end }}
# The child job's pods, listed and deleted to restart a stalled run (spec.monitoring.onStall restart).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "delete"]
# The trainer config ConfigMap (replaced, with update, when an earlier attempt left another spec's config).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "update"]
# The trainer's ServiceAccount, Role and RoleBinding (it may patch only its own ForgeJob's status).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "get"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "get"]
# Events on ForgeJobs (kopf and the operator).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
Cluster-scoped rules. kopf observes CRDs to notice resources appearing or disappearing. With a list of namespaces
(namespaced install) kopf also lists and watches namespaces to match them; without that right it retries for about
a minute at every start before falling back to the exact names. A cluster-wide install never lists namespaces.
*/}}
{{- define "forge.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- if not (include "forge.clusterWide" .) }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
