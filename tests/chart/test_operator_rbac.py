"""The operator, running with exactly the chart's RBAC (its rendered ServiceAccount's token), reconciles a ForgeJob,
for a namespaced and for a cluster-wide install; and that RBAC grants nothing beyond what the operator needs."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from forge_dev.controlplane import free_port
from forge_operator.permissions import CODE
from tests.chart.helm import wait_for
from tests.chart.install import condition, create_forgejob, dump, forgejob, get_forgejob, installed
from tests.conftest import LocalCluster

# A 403 as an HTTP status or an ApiException's "(403)", not the digits in a timestamp or a resourceVersion.
PERMISSION_PROBLEM = re.compile(r'HTTP/1\.1" 403\b|\(403\)|forbidden|not enough permissions|permission', re.IGNORECASE)


def requests_made(metrics_port: int) -> set[tuple[str, str, str]]:
    """(verb, group, resource) of every request the operator counted in forge_api_requests_total."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = r'^forge_api_requests_total\{group="([^"]*)",resource="([^"]*)",verb="([^"]*)"\} (\S+)$'
    return {(verb, group, resource) for group, resource, verb, count in re.findall(pattern, text, re.M) if float(count)}


def forbidden(call: Callable[[], object]) -> bool:
    try:
        call()
    except ApiException as err:
        return bool(err.status == 403)
    return False


@pytest.mark.parametrize("mode", ["namespaced", "cluster-wide"])
def test_operator_reconciles_with_rendered_rbac(
    mode: str, cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    values = {
        "operator": {
            "watchNamespaces": [namespace] if mode == "namespaced" else [],
            "healthPort": free_port(),
            "metricsPort": free_port(),
            "logLevel": "debug",
        },
        "trainer": {"metricsPort": free_port()},
    }
    with installed(cluster, namespace, tmp_path, values) as install, cluster.api_client() as admin:
        name = "rbac-check"
        create_forgejob(admin, forgejob(name, namespace))
        custom = client.CustomObjectsApi(admin)

        def pytorchjob() -> dict[str, object] | None:
            try:
                got: dict[str, object] = custom.get_namespaced_custom_object(
                    "kubeflow.org", "v1", namespace, "pytorchjobs", name
                )
                return got
            except ApiException as err:
                if err.status == 404:
                    return None
                raise

        try:
            job = wait_for(f"PyTorchJob {namespace}/{name} created by the operator", pytorchjob, timeout=45)
        except AssertionError:
            raise AssertionError(
                f"{dump(get_forgejob(admin, namespace, name).get('status'))}\noperator log:\n{install.log()[-6000:]}"
            ) from None
        owners = job["metadata"]["ownerReferences"]  # type: ignore[index]
        assert [o["kind"] for o in owners] == ["ForgeJob"]

        def accepted() -> dict[str, object] | None:
            return condition(get_forgejob(admin, namespace, name), "Accepted")

        cond = wait_for("condition Accepted on the ForgeJob", accepted, timeout=30)
        assert cond["status"] == "True", cond
        core = client.CoreV1Api(admin)
        assert core.read_namespaced_config_map(f"{name}-config", namespace)
        assert core.read_namespaced_service_account(f"{name}-trainer", namespace)
        rbac = client.RbacAuthorizationV1Api(admin)
        assert rbac.read_namespaced_role(f"{name}-trainer", namespace)
        assert rbac.read_namespaced_role_binding(f"{name}-trainer", namespace)

        # Events were posted with the operator's credentials.
        # (kopf posts them in the background: on a loaded machine the first may come after the status.)
        def event_on_the_forgejob() -> bool | None:
            events = core.list_namespaced_event(namespace).items
            return any(e.involved_object.name == name for e in events) or None

        wait_for("an Event on the ForgeJob", event_on_the_forgejob, timeout=30)

        problems = [line for line in install.log().splitlines() if PERMISSION_PROBLEM.search(line)]
        assert not problems, "the operator hit RBAC limits:\n" + "\n".join(problems[:20])

        # The other backend with the same RBAC: a ForgeJob run as a Kubeflow Trainer v2 TrainJob.
        create_forgejob(admin, forgejob("rbac-trainjob", namespace, backend="trainjob"))

        def trainjob() -> dict[str, object] | None:
            try:
                got: dict[str, object] = custom.get_namespaced_custom_object(
                    "trainer.kubeflow.org", "v1alpha1", namespace, "trainjobs", "rbac-trainjob"
                )
                return got
            except ApiException as err:
                if err.status == 404:
                    return None
                raise

        try:
            wait_for(f"TrainJob {namespace}/rbac-trainjob created by the operator", trainjob, timeout=45)
        except AssertionError:
            status = get_forgejob(admin, namespace, "rbac-trainjob").get("status")
            raise AssertionError(f"{dump(status)}\noperator log:\n{install.log()[-6000:]}") from None

        # Every request the operator's code made is in forge_operator.permissions.CODE (which the chart grants).
        used = requests_made(values["operator"]["metricsPort"])
        assert ("create", "kubeflow.org", "pytorchjobs") in used, used
        assert ("create", "trainer.kubeflow.org", "trainjobs") in used, used
        outside = {
            (verb, group, resource)
            for verb, group, resource in used
            if resource  # API discovery, allowed to every authenticated user
            and resource != "selfsubjectaccessreviews"  # likewise (system:basic-user)
            and verb not in CODE.get((group, resource), frozenset())
        }
        assert not outside, f"requests outside forge_operator.permissions.CODE: {sorted(outside)}"

        # Least privilege: what the operator never needs is refused.
        with install.operator_api() as op:
            op_core = client.CoreV1Api(op)
            assert forbidden(lambda: op_core.list_namespaced_secret(namespace)), "operator can read Secrets"
            assert forbidden(
                lambda: op_core.create_namespaced_pod(
                    namespace, {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}}
                )
            ), "operator can create Pods"
            assert forbidden(lambda: op_core.delete_namespaced_config_map(f"{name}-config", namespace)), (
                "operator can delete ConfigMaps"
            )
            assert forbidden(
                lambda: client.CustomObjectsApi(op).delete_namespaced_custom_object(
                    "forge.dev", "v1alpha1", namespace, "forgejobs", name
                )
            ), "operator can delete ForgeJobs"
            if mode == "namespaced":
                assert forbidden(lambda: op_core.list_namespaced_config_map("default")), (
                    "a namespaced install can read ConfigMaps outside its watched namespaces"
                )
                assert forbidden(lambda: op_core.list_secret_for_all_namespaces()), "operator can read all Secrets"
