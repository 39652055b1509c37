"""When the cluster says no, on the real local API server: a missing API and missing RBAC are named, with what to
install or grant, in Accepted=Unknown and in the operator's start-up line; retries back off and post one Event."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from forge_operator.handlers.handle_reconcile_forgejob import backoff_seconds
from forge_operator.handlers.handle_startup import check_cluster, startup_line
from forge_operator.kube import Kube as OperatorKube
from forge_operator.kube import refusal
from tests.chart.install import service_account_kubeconfig
from tests.conftest import LocalCluster
from tests.operator.conftest import OPERATOR_DEFAULTS
from tests.operator.helpers import Kube, OperatorProcess, forgejob, wait_for

ACCOUNT = "forge-op"


def rules(create_pytorchjobs: bool) -> list[dict[str, Any]]:
    """The chart's namespaced rules, optionally without `create` on pytorchjobs."""
    pytorchjob_verbs = ["get", "list", "watch", "patch", "delete"] + (["create"] if create_pytorchjobs else [])
    return [
        {"apiGroups": ["forge.dev"], "resources": ["forgejobs"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["forge.dev"], "resources": ["forgejobs/status"], "verbs": ["get", "patch"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": pytorchjob_verbs},
        {
            "apiGroups": [""],
            "resources": ["configmaps", "serviceaccounts"],
            "verbs": ["create", "get", "list", "watch", "patch", "update"],
        },
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["roles", "rolebindings"],
            "verbs": ["create", "get", "list", "watch", "patch"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]


@pytest.fixture
def restricted_operator(cluster: LocalCluster, kube: Kube, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator with its own ServiceAccount, whose Role lacks `create` on pytorchjobs."""
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": ACCOUNT}})
    kube.rbac.create_namespaced_role(namespace, {"metadata": {"name": ACCOUNT}, "rules": rules(False)})
    subject = {"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}
    kube.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": ACCOUNT},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
            "subjects": [subject],
        },
    )
    cluster_role = f"forge-refusals-{uuid.uuid4().hex[:8]}"
    kube.rbac.create_cluster_role(
        {
            "metadata": {"name": cluster_role},
            "rules": [
                {
                    "apiGroups": ["apiextensions.k8s.io"],
                    "resources": ["customresourcedefinitions"],
                    "verbs": ["get", "list", "watch"],
                },
                {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
            ],
        }
    )
    kube.rbac.create_cluster_role_binding(
        {
            "metadata": {"name": cluster_role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [subject],
        }
    )
    kubeconfig = service_account_kubeconfig(cluster, namespace, ACCOUNT, tmp_path / "kubeconfig")
    env = {**OPERATOR_DEFAULTS, "FORGE_NAMESPACES": namespace, "FORGE_RETRY_MAX_SECONDS": "10"}
    process = OperatorProcess(kubeconfig, tmp_path / "operator.log", extra_env=env)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        kube.rbac.delete_cluster_role_binding(cluster_role)
        kube.rbac.delete_cluster_role(cluster_role)


def errors_counted(operator: OperatorProcess, kind: str) -> float:
    match = re.search(rf'^forge_reconcile_errors_total\{{kind="{kind}"\}} (\S+)$', operator.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def test_missing_rbac_is_named_backed_off_and_recovers_once_granted(
    kube: Kube, restricted_operator: OperatorProcess, namespace: str
) -> None:
    log = restricted_operator.log_tail(200)
    assert "cluster check FAILED" in log and f"may not create kubeflow.org/pytorchjobs in namespace {namespace}" in log

    kube.create_forgejob(namespace, forgejob("denied"))

    def refused() -> dict[str, Any] | None:
        accepted = kube.condition(namespace, "denied", "Accepted")
        return accepted if accepted and accepted["status"] == "Unknown" else None

    accepted = wait_for(refused, what="Accepted=Unknown", context=restricted_operator.log_tail)
    assert accepted["reason"] == "Forbidden"
    assert f"create /apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs" in accepted["message"]
    assert "Grant the operator's ServiceAccount this permission" in accepted["message"]
    # Several retries later (5 s, 10 s, 10 s with this ceiling): still one Event, no ReconcileError per retry.
    wait_for(lambda: errors_counted(restricted_operator, "Forbidden") >= 3, timeout=60, what="three refused tries")
    events = kube.events(namespace, "denied")
    assert [e for e in events if e[1] == "Forbidden"] == [("Warning", "Forbidden", accepted["message"])]
    assert not [e for e in events if e[1] in ("ReconcileError", "Logging")]
    assert kube.pytorchjob(namespace, "denied") is None

    kube.rbac.patch_namespaced_role(ACCOUNT, namespace, {"rules": rules(True)})
    wait_for(
        lambda: (kube.condition(namespace, "denied", "Accepted") or {}).get("status") == "True",
        timeout=60,
        what="Accepted=True once granted",
        context=restricted_operator.log_tail,
    )
    assert kube.pytorchjob(namespace, "denied") is not None


def test_an_api_the_server_does_not_serve_is_named_with_what_to_install(cluster: LocalCluster) -> None:
    """The PyTorchJob CRD cannot be removed from the shared test cluster, so ask for a version nobody serves: the
    API server answers exactly as it does for a missing CRD (404 without an object Status)."""
    with cluster.api_client() as api:
        kube = OperatorKube(api)
        with pytest.raises(ApiException) as raised:
            kube.request("POST", "/apis/kubeflow.org/v9/namespaces/default/pytorchjobs", {"metadata": {"name": "x"}})
        refused = refusal(raised.value)
        assert refused is not None and refused.reason == "MissingAPI"
        assert "create /apis/kubeflow.org/v9/namespaces/default/pytorchjobs" in refused.message
        assert "kubectl get crd pytorchjobs.kubeflow.org" in refused.message
        assert kube.get("ConfigMap", "default", "surely-not-there") is None, "a missing object is no refusal"

        missing = (("/apis/kubeflow.org/v9", "pytorchjobs", "the Kubeflow training-operator"),)
        problems = check_cluster(kube, "default", apis=missing, access=())
        assert problems == ["/apis/kubeflow.org/v9/pytorchjobs is not served: install the Kubeflow training-operator"]
        level, line = startup_line(problems, ["default"])
        assert level == logging.ERROR
        assert "cluster check FAILED" in line and "install the Kubeflow training-operator" in line
        assert check_cluster(kube, "default") == [], "the admin of the test cluster has everything"


def test_an_unreachable_api_server_is_an_outage() -> None:
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: nothing listens
    configuration.retries = 0
    with client.ApiClient(configuration) as api, pytest.raises(urllib3.exceptions.HTTPError) as raised:
        OperatorKube(api).get("ConfigMap", "default", "x")
    refused = refusal(raised.value)
    assert refused is not None and refused.reason == "APIUnavailable"
    assert "get /api/v1/namespaces/default/configmaps/x" in refused.message


@pytest.mark.parametrize(("retry", "delay"), [(0, 5), (1, 10), (2, 20), (5, 160), (6, 300), (50, 300)])
def test_backoff_doubles_up_to_the_ceiling(retry: int, delay: int) -> None:
    assert backoff_seconds(retry, 300) == delay
