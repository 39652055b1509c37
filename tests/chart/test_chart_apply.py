"""The rendered manifests are accepted by the real local API server (Kubernetes 1.20)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.chart.helm import MONITORING_API_VERSIONS, apply_objects, delete_cluster_objects, template, wait_for
from tests.conftest import LocalCluster

# The Prometheus operator's CRDs are not part of the local control plane. These stand-ins check what the chart's
# monitors must have (the fields the Prometheus operator requires to select and scrape) and keep the rest.
MONITORING_CRDS: list[dict[str, Any]] = [
    {
        "kind": kind,
        "plural": plural,
        "required": required,
    }
    for kind, plural, required in (
        ("ServiceMonitor", "servicemonitors", ["selector", "endpoints"]),
        ("PodMonitor", "podmonitors", ["selector", "podMetricsEndpoints"]),
    )
]


def monitoring_crd(kind: str, plural: str, required: list[str]) -> dict[str, Any]:
    array_of_objects = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    }
    spec_props: dict[str, Any] = {
        "selector": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "namespaceSelector": {
            "type": "object",
            "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
        },
        required[1]: array_of_objects,
    }
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": required,
                "properties": spec_props,
                "x-kubernetes-preserve-unknown-fields": True,
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }


@pytest.fixture
def monitoring_crds(cluster: LocalCluster) -> Iterator[None]:
    """Minimal ServiceMonitor/PodMonitor CRDs for one test; removed afterwards, so that the rest of the session
    sees a cluster without the Prometheus operator's API (as the chart's capability checks expect)."""
    with cluster.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        names = []
        for crd in MONITORING_CRDS:
            body = monitoring_crd(crd["kind"], crd["plural"], crd["required"])
            name = body["metadata"]["name"]
            ext.create_custom_resource_definition(body)
            names.append(name)

            def established(name: str = name) -> bool:
                conditions = ext.read_custom_resource_definition(name).status.conditions or []
                return any(c.type == "Established" and c.status == "True" for c in conditions)

            wait_for(f"CRD {name} established", established, timeout=30)
        try:
            yield
        finally:
            for name in names:
                ext.delete_custom_resource_definition(name)
            for name in names:

                def gone(name: str = name) -> bool:
                    try:
                        ext.read_custom_resource_definition(name)
                    except client.ApiException as err:
                        return bool(err.status == 404)
                    return False

                wait_for(f"CRD {name} deleted", gone, timeout=60)


def release_name() -> str:
    return f"r{uuid.uuid4().hex[:8]}"


def test_default_install_is_accepted(cluster: LocalCluster, namespace: str, tmp_path: Path) -> None:
    release = release_name()  # cluster-scoped objects (ClusterRole, ClusterRoleBinding) get unique names
    objects = template(tmp_path, release=release, namespace=namespace)
    with cluster.api_client() as api:
        try:
            stored = apply_objects(api, objects, namespace)
            assert sorted(o["kind"] for o in stored) == sorted(o["kind"] for o in objects)
            dep = next(o for o in stored if o["kind"] == "Deployment")
            container = dep["spec"]["template"]["spec"]["containers"][0]
            # Nothing the chart sets was dropped by the server (a misplaced field would be pruned silently).
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert dep["spec"]["strategy"]["type"] == "Recreate"
            crb = next(o for o in stored if o["kind"] == "ClusterRoleBinding")
            assert crb["subjects"][0]["namespace"] == namespace
        finally:
            delete_cluster_objects(api, objects)


def test_namespaced_install_with_monitors_is_accepted(
    cluster: LocalCluster, namespace: str, monitoring_crds: None, tmp_path: Path
) -> None:
    release = release_name()
    other = f"{namespace}-b"
    values = {
        "operator": {"watchNamespaces": [namespace, other], "image": {"repository": "example.com/forge-operator"}},
        "trainer": {"image": {"repository": "example.com/forge-trainer", "tag": "cu128"}},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        "dashboard": {"enabled": False},
    }
    objects = template(tmp_path, values, release=release, namespace=namespace, api_versions=MONITORING_API_VERSIONS)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("Role") == 2 and kinds.count("RoleBinding") == 2
    assert "ServiceMonitor" in kinds and "PodMonitor" in kinds and "ConfigMap" not in kinds
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
        try:
            stored = apply_objects(api, objects, namespace)
            assert sorted(o["kind"] for o in stored) == kinds
            roles = {o["metadata"]["namespace"] for o in stored if o["kind"] == "Role"}
            assert roles == {namespace, other}
        finally:
            delete_cluster_objects(api, objects)
            core.delete_namespace(other)
