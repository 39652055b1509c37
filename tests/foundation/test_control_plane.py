"""The local control plane is a real Kubernetes API: CRD schema validation, status subresource, GC, clean stop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from forge_dev.controlplane import ControlPlane, ControlPlaneError, running_control_plane_pids
from tests.conftest import LocalCluster

GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "gadgets.test.forge.dev"},
    "spec": {
        "group": "test.forge.dev",
        "scope": "Namespaced",
        "names": {"kind": "Gadget", "plural": "gadgets", "singular": "gadget", "listKind": "GadgetList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10}},
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string", "enum": ["Idle", "Busy"]}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def _gadget(name: str, size: int) -> dict[str, Any]:
    return {"apiVersion": "test.forge.dev/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": {"size": size}}


@pytest.fixture(scope="module")
def gadget_crd(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    import yaml

    from forge_dev.crds import install_crds

    path = tmp_path_factory.mktemp("crd") / "gadget.yaml"
    path.write_text(yaml.safe_dump(GADGET_CRD))
    with cluster.api_client() as api:
        install_crds(api, [path])
    return "gadgets"


def test_custom_resource_status_subresource_and_schema_validation(
    cluster: LocalCluster, namespace: str, gadget_crd: str
) -> None:
    with cluster.api_client() as api:
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object("test.forge.dev", "v1", namespace, gadget_crd, _gadget("g1", 3))

        objects.patch_namespaced_custom_object_status(
            "test.forge.dev", "v1", namespace, gadget_crd, "g1", {"status": {"phase": "Busy"}}
        )
        stored = objects.get_namespaced_custom_object("test.forge.dev", "v1", namespace, gadget_crd, "g1")
        assert stored["status"] == {"phase": "Busy"}
        assert stored["spec"] == {"size": 3}

        # A status write through the main resource is ignored when the status subresource is on.
        stored["status"] = {"phase": "Idle"}
        objects.replace_namespaced_custom_object("test.forge.dev", "v1", namespace, gadget_crd, "g1", stored)
        again = objects.get_namespaced_custom_object("test.forge.dev", "v1", namespace, gadget_crd, "g1")
        assert again["status"] == {"phase": "Busy"}

        with pytest.raises(ApiException) as rejected:
            objects.create_namespaced_custom_object(
                "test.forge.dev", "v1", namespace, gadget_crd, _gadget("too-big", 99)
            )
        assert rejected.value.status == 422
        assert "spec.size" in str(rejected.value.body)

        with pytest.raises(ApiException) as bad_status:
            objects.patch_namespaced_custom_object_status(
                "test.forge.dev", "v1", namespace, gadget_crd, "g1", {"status": {"phase": "Exploded"}}
            )
        assert bad_status.value.status == 422
        assert "status.phase" in str(bad_status.value.body)


def test_garbage_collector_deletes_owned_objects(cluster: LocalCluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
        )
        reference = client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid, controller=True
        )
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="child", owner_references=[reference]))
        )
        core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = {item.metadata.name for item in core.list_namespaced_config_map(namespace).items}
            if "child" not in names:
                break
            time.sleep(0.2)
        assert "child" not in names, "kube-controller-manager's garbage collector did not delete the owned object"


def test_service_account_tokens_are_issued(cluster: LocalCluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="robot"))
        )
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
        token = core.create_namespaced_service_account_token("robot", namespace, request)
        assert token.status.token.count(".") == 2  # a signed JWT


def test_second_control_plane_stops_cleanly_and_leaves_no_process(tmp_path: Path) -> None:
    plane = ControlPlane(workdir=tmp_path / "cp", with_controller_manager=True)
    with plane:
        pids = plane.pids()
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert plane.kubeconfig.is_file()
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still running after stop"


def test_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    before = set(running_control_plane_pids())
    plane = ControlPlane(workdir=tmp_path / "cp", ready_timeout_s=0.0)
    with pytest.raises(ControlPlaneError, match="not ready"):
        plane.start()
    assert set(running_control_plane_pids()) <= before
