"""The chart installed into the local API server, and the operator run as its Deployment would run it: the same
command (the image's entry point, ``forge-operator``), the same FORGE_* environment, and the rendered
ServiceAccount's credentials only (a TokenRequest token in a kubeconfig), so its RBAC is exactly the rendered one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from forge_dev.services import http_ok, managed_process
from tests.chart.helm import apply_objects, delete_cluster_objects, one, template
from tests.conftest import LocalCluster

VENV_BIN = Path(sys.executable).parent
OPERATOR_COMMAND = [
    str(VENV_BIN / "forge-operator")
]  # the operator image's ENTRYPOINT (see tests/chart/test_images.py)


@dataclass
class Install:
    """A rendered and applied release, with its operator process."""

    cluster: LocalCluster
    namespace: str
    release: str
    objects: list[dict[str, Any]]
    kubeconfig: Path
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def service_account(self) -> str:
        return str(one(self.objects, "ServiceAccount")["metadata"]["name"])

    @property
    def health_port(self) -> int:
        return int(self.env["FORGE_HEALTH_PORT"])

    @property
    def metrics_port(self) -> int:
        return int(self.env["FORGE_METRICS_PORT"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def operator_api(self) -> client.ApiClient:
        """An API client with the operator's credentials (its ServiceAccount token)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def rendered_env(deployment: dict[str, Any], namespace: str) -> dict[str, str]:
    """The operator container's environment as the kubelet would give it (fieldRefs resolved)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
        else:
            raise AssertionError(f"unsupported env source in the rendered Deployment: {var}")
    assert not container.get("command") and not container.get("args"), (
        "the Deployment must run the image's entry point (forge-operator) unchanged"
    )
    return env


def service_account_kubeconfig(cluster: LocalCluster, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig holding a bound token of ``service_account`` from the TokenRequest API."""
    with cluster.api_client() as api:
        token = client.CoreV1Api(api).create_namespaced_service_account_token(
            service_account, namespace, {"spec": {"audiences": [], "expirationSeconds": 3600}}
        )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": cluster.server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": service_account, "user": {"token": token.status.token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@contextmanager
def installed(
    cluster: LocalCluster, namespace: str, tmp: Path, values: dict[str, Any], start_operator: bool = True
) -> Iterator[Install]:
    """Render the chart with ``values`` as release into ``namespace``, apply every object, and run the operator
    with the rendered environment and ServiceAccount. Cluster-scoped objects are deleted afterwards."""
    release = f"r{uuid.uuid4().hex[:8]}"
    objects = template(tmp, values, release=release, namespace=namespace)
    with cluster.api_client() as api:
        apply_objects(api, objects, namespace)
        try:
            install = Install(
                cluster=cluster,
                namespace=namespace,
                release=release,
                objects=objects,
                kubeconfig=tmp / "operator.kubeconfig",
                log_path=tmp / "operator.log",
                env=rendered_env(one(objects, "Deployment"), namespace),
            )
            service_account_kubeconfig(cluster, namespace, install.service_account, install.kubeconfig)
            if start_operator:
                with running(install):
                    yield install
            else:
                yield install
        finally:
            delete_cluster_objects(api, objects)


def process_env(install: Install) -> dict[str, str]:
    """Only what a container would have: no admin KUBECONFIG, no in-cluster variables of this machine."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(install.env)
    env["KUBECONFIG"] = str(install.kubeconfig)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def running(install: Install) -> Iterator[Install]:
    """The operator as a process with the rendered Deployment's command and environment, until the block ends."""
    # managed_process appends to the log; each install has its own folder, so the log holds this run only
    health = f"http://127.0.0.1:{install.health_port}/healthz"
    with managed_process(
        "the operator (kopf --liveness /healthz)",
        list(OPERATOR_COMMAND),
        install.log_path,
        lambda: http_ok(health),
        env=process_env(install),
    ) as proc:
        install.process = proc
        yield install


def forgejob(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A ForgeJob manifest; ``spec`` keys override the defaults of a small CPU job."""
    body: dict[str, Any] = {
        "apiVersion": "forge.dev/v1alpha1",
        "kind": "ForgeJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"base": "s3://models/tiny-3m"},
            "technique": "cpt",
            "data": {
                "domainPercent": 75,
                "domain": [{"uri": "s3://acme/tickets/"}],
                "general": [{"uri": "s3://curated/general/"}],
                "seqLength": 128,
            },
            "training": {"learningRate": "1e-3", "maxSteps": 10, "microBatchSize": 4, "globalBatchTokens": 1024},
            "eval": {"everySteps": 5},
            "checkpoints": {"everySteps": 5, "output": "s3://acme/forge/out/"},
            "resources": {"nodes": 1, "gpusPerNode": 0},
        },
    }
    body["spec"].update(spec)
    return body


def create_forgejob(api: client.ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        "forge.dev", "v1alpha1", body["metadata"]["namespace"], "forgejobs", body
    )
    return created


def get_forgejob(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    got: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "forge.dev", "v1alpha1", namespace, "forgejobs", name
    )
    return got


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)[:3000]
