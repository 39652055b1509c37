"""The RBAC the operator needs, derived from what its code does; the chart's rules are tested against it.

``CODE`` is what ``kube.Kube`` requests (each request is also counted by verb and resource in
``forge_api_requests_total``, so a cluster test can check that nothing outside this table was used); ``KOPF`` is what
the framework itself does (watches, its progress annotations, Events); ``ESCALATION`` is what the trainer Role the
operator creates grants: Kubernetes lets a subject create a Role only with permissions it holds itself.
"""

from __future__ import annotations

from forge_operator.api import GROUP, PLURAL, BackendName

Permissions = dict[tuple[str, str], frozenset[str]]

# The child job of each backend (forge_operator.backends): what the code and kopf do with it. The chart grants the
# rules of the backends it enables (operator.backends).
BACKEND_CODE: dict[BackendName, Permissions] = {
    # delete: spec.monitoring.onStall fail stops the run (forge_operator.child_pods)
    "pytorchjob": {("kubeflow.org", "pytorchjobs"): frozenset({"get", "create", "patch", "delete"})},
    "trainjob": {("trainer.kubeflow.org", "trainjobs"): frozenset({"get", "create", "patch", "delete"})},
}
BACKEND_KOPF: dict[BackendName, Permissions] = {
    "pytorchjob": {("kubeflow.org", "pytorchjobs"): frozenset({"list", "watch"})},
    "trainjob": {("trainer.kubeflow.org", "trainjobs"): frozenset({"list", "watch"})},
}

BASE_CODE: Permissions = {
    (GROUP, PLURAL): frozenset({"get"}),
    (GROUP, f"{PLURAL}/status"): frozenset({"patch"}),
    # ownerReferences with blockOwnerDeletion: clusters that enforce OwnerReferencesPermissionEnforcement check it.
    (GROUP, f"{PLURAL}/finalizers"): frozenset({"update"}),
    # a stall restart deletes the child job's pods, which the child's controller re-creates (forge_operator.child_pods)
    ("", "pods"): frozenset({"list", "delete"}),
    ("", "configmaps"): frozenset({"get", "create", "update"}),
    ("", "serviceaccounts"): frozenset({"get", "create"}),
    ("rbac.authorization.k8s.io", "roles"): frozenset({"get", "create"}),
    ("rbac.authorization.k8s.io", "rolebindings"): frozenset({"get", "create"}),
}
BASE_KOPF: Permissions = {
    (GROUP, PLURAL): frozenset({"list", "watch", "patch"}),
    ("", "events"): frozenset({"create"}),
}
ESCALATION: Permissions = {
    (GROUP, PLURAL): frozenset({"get"}),
    (GROUP, f"{PLURAL}/status"): frozenset({"get", "patch"}),
}
# Cluster-scoped, for kopf: it follows CRDs to notice resources appearing (and namespaces, when it watches a list).
CLUSTER: Permissions = {("apiextensions.k8s.io", "customresourcedefinitions"): frozenset({"get", "list", "watch"})}


def merged(*tables: Permissions) -> Permissions:
    result: dict[tuple[str, str], frozenset[str]] = {}
    for table in tables:
        for key, verbs in table.items():
            result[key] = result.get(key, frozenset()) | verbs
    return result


def namespaced(backends: tuple[BackendName, ...] = ("pytorchjob", "trainjob")) -> Permissions:
    """Every namespaced rule of an operator that may create the child jobs of ``backends``."""
    return merged(
        BASE_CODE,
        BASE_KOPF,
        ESCALATION,
        *(BACKEND_CODE[name] for name in backends),
        *(BACKEND_KOPF[name] for name in backends),
    )


CODE: Permissions = merged(BASE_CODE, *BACKEND_CODE.values())
KOPF: Permissions = merged(BASE_KOPF, *BACKEND_KOPF.values())
NAMESPACED: Permissions = namespaced()


def api_resource(path: str) -> tuple[str, str]:
    """(group, resource[/subresource]) of a request path: '/apis/kubeflow.org/v1/namespaces/a/pytorchjobs/x' ->
    ('kubeflow.org', 'pytorchjobs'); '/api/v1/namespaces/a/configmaps' -> ('', 'configmaps')."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return "", "/".join(parts)
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    if not rest:
        return group, ""
    resource = rest[0]
    if len(rest) >= 3:
        resource += f"/{rest[2]}"
    return group, resource
