"""The Helm chart with a real helm binary: lint, template with default and non-default values, the values schema,
documentation of every value, and the single-source CRD."""

from __future__ import annotations

import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helm import CHART, MONITORING_API_VERSIONS, REPO_ROOT, by_kind, helm, one, template, value_args
from tests.conftest import LocalCluster

NON_DEFAULT: dict[str, Any] = {
    "operator": {
        "watchNamespaces": ["team-a", "team-b"],
        "logLevel": "debug",
        "image": {"repository": "registry.example.com/ml/forge-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "extraEnv": [{"name": "FORGE_WORKERS", "value": "4"}],
    },
    "trainer": {
        "image": {"repository": "registry.example.com/ml/forge-trainer", "tag": "1.2.3-cu128"},
        "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "48Gi"}},
        "metricsPort": 9500,
    },
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "dashboard": {"enabled": False},
    "commonLabels": {"team": "ml-platform"},
}

# trainer.resources in values.yaml.
DEFAULT_TRAINER_RESOURCES = {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi"}}

STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
    "helm.sh/chart",
)


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


# --- lint -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default", "non-default"])
def test_helm_lint_strict(values: dict[str, Any] | None, tmp_path: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), *value_args(values, tmp_path))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout


# --- default values -----------------------------------------------------------------------------------------------


def test_default_render(tmp_path: Path) -> None:
    objects = template(tmp_path)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ConfigMap"]
    ), kinds
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks labels {missing}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"

    dep = one(objects, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports[get["port"]] == 8080, probe
    # A read-only root filesystem needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["image"] == "forge-operator:0.1.0"

    env = env_of(dep)
    assert env["FORGE_NAMESPACES"] == ""
    assert env["FORGE_TRAINER_IMAGE"] == "forge-trainer:0.1.0"
    assert env["FORGE_LOG_LEVEL"] == "INFO"
    assert env["FORGE_METRICS_PORT"] == str(ports["metrics"])
    assert env["FORGE_HEALTH_PORT"] == str(ports["health"])
    assert env["FORGE_TRAINER_METRICS_PORT"] == "9400"
    assert json.loads(env["FORGE_TRAINER_RESOURCES"]) == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "128Gi"},
    }

    svc = one(objects, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    sa = one(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    crb = one(objects, "ClusterRoleBinding")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "forge-system"}]
    assert crb["roleRef"]["name"] == one(objects, "ClusterRole")["metadata"]["name"]

    cm = one(objects, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["forge.json"]) == json.loads((CHART / "dashboards" / "forge.json").read_text())


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_cluster_wide_rbac_is_exactly_what_the_code_uses(tmp_path: Path) -> None:
    """The ClusterRole of a default install grants the verbs of forge_operator.permissions, nothing more or less."""
    from forge_operator.permissions import CLUSTER, NAMESPACED

    role = one(template(tmp_path), "ClusterRole")
    got = rules_of(role)
    expected = {
        (group, resource, verb) for (group, resource), verbs in {**NAMESPACED, **CLUSTER}.items() for verb in verbs
    }
    assert got == expected, f"extra: {sorted(got - expected)}; missing: {sorted(expected - got)}"
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in role["rules"])
    assert ("", "configmaps", "list") not in got and ("", "configmaps", "watch") not in got
    assert ("forge.dev", "forgejobs/finalizers", "update") in got


def test_rbac_covers_only_the_enabled_backends(tmp_path: Path) -> None:
    """operator.backends [pytorchjob]: no rule on trainjobs, and the operator is told so (FORGE_BACKENDS)."""
    from forge_operator.permissions import CLUSTER, namespaced

    values = {"operator": {"backends": ["pytorchjob"], "defaultBackend": "pytorchjob"}}
    objects = template(tmp_path, values)
    got = rules_of(one(objects, "ClusterRole"))
    expected = {
        (group, resource, verb)
        for (group, resource), verbs in {**namespaced(("pytorchjob",)), **CLUSTER}.items()
        for verb in verbs
    }
    assert got == expected, f"extra: {sorted(got - expected)}; missing: {sorted(expected - got)}"
    assert not {rule for rule in got if rule[0] == "trainer.kubeflow.org"}
    env = env_of(one(objects, "Deployment"))
    assert env["FORGE_BACKENDS"] == "pytorchjob" and env["FORGE_DEFAULT_BACKEND"] == "pytorchjob"
    trainjob_only = {"operator": {"backends": ["trainjob"], "defaultBackend": "trainjob"}}
    got = rules_of(one(template(tmp_path, trainjob_only), "ClusterRole"))
    assert ("trainer.kubeflow.org", "trainjobs", "create") in got
    assert not {rule for rule in got if rule[0] == "kubeflow.org"}


def test_trainer_pods_of_a_default_install_pass_pod_security_restricted(tmp_path: Path) -> None:
    """The operator configured as the default chart configures it renders trainer pods that meet "restricted"; so
    does the operator's own pod."""
    from forge_operator.api import ForgeJobSpec
    from forge_operator.render import Owner, build_pytorchjob
    from forge_operator.settings import Settings
    from tests.operator.pod_security import restricted_violations

    objects = template(tmp_path)
    deployment = one(objects, "Deployment")
    env = env_of(deployment)
    settings = Settings(**{k.removeprefix("FORGE_").lower(): v for k, v in env.items() if k.startswith("FORGE_")})
    spec = ForgeJobSpec.model_validate(
        {
            "model": {"base": "s3://models/llama-3.2-1b"},
            "technique": "sft",
            "data": {"domain": [{"uri": "s3://acme/tickets/"}], "general": [{"uri": "s3://curated/chat/"}]},
            "checkpoints": {"output": "s3://acme/forge/"},
            "resources": {"nodes": 2, "gpusPerNode": 8},
        }
    )
    job = build_pytorchjob(Owner("bot", "team-a", "uid-1"), spec, settings.render_options())
    for replica_type, replica in job["spec"]["pytorchReplicaSpecs"].items():
        assert restricted_violations(replica["template"]["spec"]) == [], replica_type
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []


# --- non-default values -------------------------------------------------------------------------------------------


def test_namespaced_install_monitors_on_dashboard_off_custom_images(tmp_path: Path) -> None:
    objects = template(tmp_path, NON_DEFAULT, release="ml", namespace="forge", api_versions=MONITORING_API_VERSIONS)
    assert not by_kind(objects, "ConfigMap"), "dashboard.enabled=false must not render the dashboard ConfigMap"

    roles = by_kind(objects, "Role")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    sa = one(objects, "ServiceAccount")
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "forge"}]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ml-forge"}
    # A namespaced install keeps only cluster-scoped rules in its ClusterRole: CRDs and namespaces, which kopf
    # observes (it lists namespaces to match its namespace list; a cluster-wide kopf never does).
    assert rules_of(one(objects, "ClusterRole")) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")
    } | {("", "namespaces", v) for v in ("list", "watch")}
    assert ("kubeflow.org", "pytorchjobs", "create") in rules_of(roles[0])

    dep = one(objects, "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ml/forge-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    env = env_of(dep)
    assert env["FORGE_NAMESPACES"] == "team-a,team-b"
    assert env["FORGE_TRAINER_IMAGE"] == "registry.example.com/ml/forge-trainer:1.2.3-cu128"
    assert env["FORGE_LOG_LEVEL"] == "DEBUG"
    assert env["FORGE_TRAINER_METRICS_PORT"] == "9500"
    assert env["FORGE_WORKERS"] == "4"
    assert json.loads(env["FORGE_TRAINER_RESOURCES"])["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert all(o["metadata"]["labels"]["team"] == "ml-platform" for o in objects)

    sm = one(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= one(objects, "Service")["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    # The operator's per-ForgeJob series keep their own namespace label (the ForgeJob's), which alerts join on.
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    pm = one(objects, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_service_monitor_selects_the_metrics_service(tmp_path: Path) -> None:
    objects = template(tmp_path, NON_DEFAULT, api_versions=MONITORING_API_VERSIONS)
    selector = one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    services = [s for s in by_kind(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["forge-metrics"]
    assert any(p["name"] == "metrics" for p in services[0]["spec"]["ports"])


def test_monitors_need_the_prometheus_operator_api(cluster: LocalCluster, tmp_path: Path) -> None:
    """Enabled monitors render only where the cluster serves monitoring.coreos.com/v1; NOTES.txt says so."""
    values = {
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        }
    }
    objects = template(tmp_path, values)
    assert not by_kind(objects, "ServiceMonitor") and not by_kind(objects, "PodMonitor")
    assert not by_kind(objects, "PrometheusRule")
    # NOTES.txt is rendered by install, not by template: a client-side dry run against the local API server (which
    # serves no monitoring.coreos.com API) shows it.
    args = ["install", "forge", str(CHART), "--dry-run=client", "--kubeconfig", str(cluster.kubeconfig)]
    proc = helm(*args, *value_args(values, tmp_path / "n"))
    assert "no ServiceMonitor was created" in proc.stdout
    assert "no PodMonitor was created" in proc.stdout
    assert "no PrometheusRule was created" in proc.stdout


def test_pod_monitor_selects_the_trainer_pods_the_operator_renders(tmp_path: Path) -> None:
    """The PodMonitor's selector and port filter match the PyTorchJob pod template of forge_operator.render."""
    from forge_operator.api import ForgeJobSpec
    from forge_operator.render import Owner, RenderOptions, build_pytorchjob

    spec = ForgeJobSpec.model_validate(
        {
            "model": {"base": "s3://models/llama-3.2-1b"},
            "technique": "sft",
            "data": {"domain": [{"uri": "s3://acme/tickets/"}], "general": [{"uri": "s3://curated/chat/"}]},
            "checkpoints": {"output": "s3://acme/forge/"},
            "resources": {"nodes": 2, "gpusPerNode": 8},
        }
    )
    job = build_pytorchjob(Owner("support-bot", "team-a", "uid-1"), spec, RenderOptions(trainer_image="t:1"))
    pm = one(template(tmp_path, NON_DEFAULT, api_versions=MONITORING_API_VERSIONS), "PodMonitor")
    selector = pm["spec"]["selector"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    (keep,) = [r for r in endpoint["relabelings"] if r["action"] == "keep"]
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]
    for replica_type, replica in job["spec"]["pytorchReplicaSpecs"].items():
        labels = replica["template"]["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items(), replica_type
        for expr in selector["matchExpressions"]:
            assert expr["operator"] == "Exists" and expr["key"] in labels, (replica_type, expr)
        ports = [p["name"] for c in replica["template"]["spec"]["containers"] for p in c.get("ports", [])]
        kept = [p for p in ports if re.fullmatch(keep["regex"], p)]
        assert kept, f"{replica_type}: no container port matches {keep['regex']!r} (ports: {ports})"
        assert "pytorchjob-port" not in kept


# --- values.schema.json -------------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"operator": {"replicas": -1}}, "operator.replicas", "greater than or equal to 0"),
    ({"operator": {"replicas": 2}}, "operator.replicas", "less than or equal to 1"),
    ({"operator": {"replicas": "one"}}, "operator.replicas", "Invalid type"),
    ({"operator": {"logLevel": "verbose"}}, "operator.logLevel", "must be one of"),
    ({"operator": {"watchNamespaces": "team-a"}}, "operator.watchNamespaces", "Invalid type"),
    ({"operator": {"watchNamespaces": ["Team_A"]}}, "operator.watchNamespaces.0", "Does not match pattern"),
    ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "operator.image.pullPolicy", "must be one of"),
    ({"operator": {"metricsPort": 70000}}, "operator.metricsPort", "less than or equal to 65535"),
    ({"operator": {"replica": 1}}, "operator", "Additional property replica is not allowed"),
    (
        {"trainer": {"resources": {"requests": {"memory": "lots"}}}},
        "trainer.resources.requests.memory",
        "Does not match pattern",
    ),
    ({"trainer": {"image": {"repository": ""}}}, "trainer.image.repository", "length must be greater"),
    ({"metrics": {"podMonitor": {"enabled": "yes"}}}, "metrics.podMonitor.enabled", "Invalid type"),
    ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "metrics.serviceMonitor.interval", "pattern"),
    ({"dashboard": {"labels": {"grafana_dashboard": 1}}}, "dashboard.labels.grafana_dashboard", "Invalid type"),
]


@pytest.mark.parametrize(("values", "path", "message"), BAD_VALUES, ids=[b[1] + ":" + b[2] for b in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], path: str, message: str, tmp_path: Path) -> None:
    proc = helm("template", "forge", str(CHART), *value_args(values, tmp_path), check=False)
    assert proc.returncode != 0, f"helm accepted bad values {values}"
    err = proc.stderr
    assert "values don't meet the specifications of the schema" in err, err
    lines = [ln.strip() for ln in err.splitlines() if ln.strip().startswith(f"- {path}:")]
    assert lines, f"helm's error does not name {path}:\n{err}"
    assert any(message in ln for ln in lines), f"expected {message!r} in {lines}"


def test_schema_accepts_the_defaults_and_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '(root)'}: schema must reject unknown keys"
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key}: not in values.schema.json"
                walk(child, node["properties"][key], f"{path}.{key}".lstrip("."))
        else:
            assert node.get("description") or node.get("anyOf") or node.get("type") == "object", path

    walk(values, schema, "")


# --- every value documented -----------------------------------------------------------------------------------------


def test_every_value_is_documented() -> None:
    """Every value of values.yaml has a `# -- description` comment right above it (helm-docs style).

    A documented key covers its whole subtree (e.g. the default `resources` map); an undocumented key must be a
    group whose own keys are each documented.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^( *)([A-Za-z][A-Za-z0-9]*):(.*)$")
    undocumented = []
    covered_below: int | None = None  # indent of a documented key whose subtree we are inside
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if covered_below is not None and indent > covered_below:
            continue
        covered_below = None
        assert m, f"line {i + 1}: unexpected line outside a documented value: {line!r}"
        j = i - 1
        comments = []
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.append(lines[j].strip())
            j -= 1
        if any(c.startswith("# --") for c in comments):
            covered_below = indent
            continue
        following = next((ln for ln in lines[i + 1 :] if ln.strip() and not ln.lstrip().startswith("#")), "")
        is_group = m.group(3).strip() == "" and len(following) - len(following.lstrip()) > indent
        if not is_group:
            undocumented.append(f"line {i + 1}: {line.strip()}")
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


# --- the CRD: one source ------------------------------------------------------------------------------------------


def test_chart_crd_is_the_top_level_crd(tmp_path: Path) -> None:
    link = CHART / "crds" / "forgejob.yaml"
    top = REPO_ROOT / "crds" / "forgejob.yaml"
    assert link.is_symlink(), f"{link} must be a symlink to {top} (one source)"
    assert link.resolve() == top.resolve()
    assert [p.name for p in (CHART / "crds").iterdir()] == ["forgejob.yaml"]

    proc = helm("template", "forge", str(CHART), "--include-crds")
    crds = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    assert crds == [yaml.safe_load(top.read_text())]

    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("forge-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.getmember("forge/crds/forgejob.yaml")
        assert member.isfile(), "helm package must store the CRD's content, not a link"
        packaged = tar.extractfile(member)
        assert packaged is not None
        assert packaged.read().decode() == top.read_text()
        names = tar.getnames()
    assert "forge/dashboards/forge.json" in names and "forge/values.schema.json" in names


# --- the operator's settings ------------------------------------------------------------------------------------

# FORGE_* variables the chart sets that forge_operator.settings.Settings does not read yet (pydantic-settings
# ignores unknown variables, so these would have no effect until the operator reads them). None at present.
PENDING_SETTINGS: dict[str, str] = {}


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default", "non-default"])
def test_operator_reads_every_setting_the_chart_sets(
    values: dict[str, Any] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Deployment's FORGE_* environment parses into the operator's Settings with the values the chart meant."""
    from forge_operator.settings import Settings

    trainer = dict((values or {}).get("trainer") or {}, image={"repository": "t", "pullPolicy": "Always"})
    values = dict(values or {}, trainer=trainer)
    env = env_of(one(template(tmp_path, values), "Deployment"))
    known = {f"FORGE_{name.upper()}" for name in Settings.model_fields}
    forge_env = {k: v for k, v in env.items() if k.startswith("FORGE_")}
    unknown = set(forge_env) - known - set(PENDING_SETTINGS)
    assert not unknown, f"the chart sets {sorted(unknown)}, which forge_operator.settings.Settings does not read"
    for name in list(os.environ):
        if name.startswith("FORGE_"):
            monkeypatch.delenv(name)
    for name, value in forge_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.namespaces == [n for n in forge_env["FORGE_NAMESPACES"].split(",") if n]
    assert settings.trainer_image == forge_env["FORGE_TRAINER_IMAGE"]
    assert settings.log_level == forge_env["FORGE_LOG_LEVEL"]
    assert settings.metrics_port == int(forge_env["FORGE_METRICS_PORT"])
    assert settings.health_port == int(forge_env["FORGE_HEALTH_PORT"])
    assert settings.trainer_metrics_port == int(forge_env["FORGE_TRAINER_METRICS_PORT"])
    assert settings.trainer_image_pull_policy == "Always"
    chart_resources = (values.get("trainer") or {}).get("resources") or DEFAULT_TRAINER_RESOURCES
    assert settings.render_options().trainer_resources == chart_resources
    pending = sorted(set(forge_env) & set(PENDING_SETTINGS) - known)
    if pending:
        warnings.warn(f"chart settings not read by the operator yet: {pending}", stacklevel=1)
