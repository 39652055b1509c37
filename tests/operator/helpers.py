"""Helpers for the operator's cluster tests: manifests, polling, the operator as a real subprocess, and a
training-operator status writer that follows Kubeflow's condition rules."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from forge_dev.controlplane import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "forge.dev", "v1alpha1", "forgejobs"
T = TypeVar("T")


def forgejob(name: str, **spec_overrides: Any) -> dict[str, Any]:
    """A small valid ForgeJob; keyword arguments replace top-level spec fields."""
    spec: dict[str, Any] = {
        "model": {"base": "s3://models/llama-3.2-1b/"},
        "technique": "sft",
        "data": {
            "domainPercent": 80,
            "domain": [{"uri": "s3://acme/tickets/", "weight": 1}],
            "general": [{"uri": "s3://curated/chat/", "weight": 2}, {"uri": "/data/reasoning.jsonl", "weight": 1}],
            "seqLength": 1024,
        },
        "eval": {"everySteps": 50, "maxTokens": 65536},
        "training": {"maxSteps": 400, "microBatchSize": 2},
        "checkpoints": {"everySteps": 100, "output": f"s3://acme/forge/{name}/"},
        "resources": {"nodes": 2, "gpusPerNode": 0},
    }
    spec.update(copy.deepcopy(spec_overrides))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ForgeJob", "metadata": {"name": name}, "spec": spec}


def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 30.0, what: str, context: Callable[[], str] | None = None
) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` (and the context) on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except ApiException as error:
            last = f"ApiException {error.status}"
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(0.1)
    extra = f"\n{context()}" if context else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}{extra}")


class Kube:
    """Admin access to the test cluster, shortened for tests."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)

    def create_forgejob(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return result

    def forgejob(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        return result

    def patch_forgejob(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch
        )
        return result

    def patch_forgejob_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, patch
        )
        return result

    def pytorchjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.custom.get_namespaced_custom_object(
                "kubeflow.org", "v1", namespace, "pytorchjobs", name
            )
            return result
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pytorchjobs(self, namespace: str) -> list[dict[str, Any]]:
        listing = self.custom.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs")
        items: list[dict[str, Any]] = listing["items"]
        return items

    def replace_pytorchjob_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        current = self.pytorchjob(namespace, name)
        assert current is not None, f"PyTorchJob {namespace}/{name} is missing"
        current["status"] = status
        result: dict[str, Any] = self.custom.replace_namespaced_custom_object_status(
            "kubeflow.org", "v1", namespace, "pytorchjobs", name, current
        )
        return result

    def condition(self, namespace: str, name: str, condition_type: str) -> dict[str, Any] | None:
        status = self.forgejob(namespace, name).get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == condition_type), None)

    def state(self, namespace: str, name: str) -> str | None:
        state: str | None = (self.forgejob(namespace, name).get("status") or {}).get("state")
        return state

    def wait_event(
        self, namespace: str, name: str, reason: str, *, kind: str | None = None, message: str | None = None
    ) -> tuple[str, str, str]:
        """Wait for an Event about ``name`` (kopf posts Events asynchronously, after the status write)."""

        def found() -> tuple[str, str, str] | None:
            for event in self.events(namespace, name):
                if event[1] == reason and kind in (None, event[0]) and message in (None, event[2]):
                    return event
            return None

        return wait_for(
            found, what=f"Event {reason} on {name}", context=lambda: f"events: {self.events(namespace, name)}"
        )

    def events(self, namespace: str, name: str) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events about one object."""
        listing = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        return [(e.type or "", e.reason or "", e.message or "") for e in listing.items]


@dataclass
class TrainingOperatorStatus:
    """Writes PyTorchJob status the way Kubeflow's training-operator (v1.9) does.

    Its rules (pkg/util/status.go): a condition whose status and reason are unchanged is left alone;
    lastTransitionTime moves only when the status flips; setting Running removes Restarting and the other way
    round; setting Succeeded or Failed turns Running False; nothing changes once Failed is True. Reasons are
    "PyTorchJob" + Created/Running/Restarting/Succeeded/Failed/Suspended/Resumed.
    """

    kube: Kube
    namespace: str
    name: str
    conditions: list[dict[str, Any]] = field(default_factory=list)
    replica_statuses: dict[str, Any] = field(default_factory=dict)
    start_time: str | None = None
    completion_time: str | None = None

    @staticmethod
    def _now() -> str:
        return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _set(self, condition_type: str, status: str, reason: str, message: str) -> None:
        if any(c["type"] == "Failed" and c["status"] == "True" for c in self.conditions):
            return
        now = self._now()
        current = next((c for c in self.conditions if c["type"] == condition_type), None)
        if current is not None and current["status"] == status and current["reason"] == reason:
            return
        transition = current["lastTransitionTime"] if current is not None and current["status"] == status else now
        kept: list[dict[str, Any]] = []
        for c in self.conditions:
            if {condition_type, c["type"]} == {"Running", "Restarting"} or c["type"] == condition_type:
                continue
            if condition_type in ("Succeeded", "Failed") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        kept.append(
            {
                "type": condition_type,
                "status": status,
                "reason": f"PyTorchJob{reason}",
                "message": message,
                "lastUpdateTime": now,
                "lastTransitionTime": transition,
            }
        )
        self.conditions = kept

    def _write(self) -> dict[str, Any]:
        status: dict[str, Any] = {"conditions": self.conditions, "replicaStatuses": self.replica_statuses}
        status["lastReconcileTime"] = self._now()
        if self.start_time:
            status["startTime"] = self.start_time
        if self.completion_time:
            status["completionTime"] = self.completion_time
        return self.kube.replace_pytorchjob_status(self.namespace, self.name, status)

    def created(self) -> dict[str, Any]:
        self._set("Created", "True", "Created", f"PyTorchJob {self.name} is created.")
        self.replica_statuses = {"Master": {}, "Worker": {}}
        return self._write()

    def running(self, workers: int = 1) -> dict[str, Any]:
        self.start_time = self.start_time or self._now()
        self._set("Running", "True", "Running", f"PyTorchJob {self.namespace}/{self.name} is running.")
        self.replica_statuses = {"Master": {"active": 1}, "Worker": {"active": workers}}
        return self._write()

    def restarting(self) -> dict[str, Any]:
        self._set(
            "Restarting",
            "True",
            "Restarting",
            f"PyTorchJob {self.name} is restarting because 1 Worker replica(s) failed.",
        )
        self.replica_statuses = {"Master": {"active": 1}, "Worker": {"failed": 1}}
        return self._write()

    def succeeded(self) -> dict[str, Any]:
        self.completion_time = self._now()
        self._set("Succeeded", "True", "Succeeded", f"PyTorchJob {self.name} is successfully completed.")
        self.replica_statuses = {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}}
        return self._write()

    def failed(self) -> dict[str, Any]:
        self.completion_time = self._now()
        self._set("Failed", "True", "Failed", f"PyTorchJob {self.name} is failed because 1 Master replica(s) failed.")
        self.replica_statuses = {"Master": {"failed": 1}, "Worker": {"active": 0}}
        return self._write()

    def suspended(self) -> dict[str, Any]:
        message = f"PyTorchJob {self.name} is suspended."
        if any(c["type"] == "Running" and c["status"] == "True" for c in self.conditions):
            self._set("Running", "False", "Suspended", message)
        self._set("Suspended", "True", "Suspended", message)
        self.replica_statuses = {"Master": {}, "Worker": {}}
        return self._write()

    def resumed(self) -> dict[str, Any]:
        self._set("Suspended", "False", "Resumed", f"PyTorchJob {self.name} is resumed.")
        return self._write()


class OperatorProcess:
    """The operator as a real subprocess (the ``forge-operator`` command), with its liveness and metrics ports."""

    def __init__(self, kubeconfig: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self, timeout: float = 60.0) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "FORGE_TRAINER_IMAGE": "registry.example/forge-trainer:test",
            "FORGE_HEALTH_PORT": str(self.health_port),
            "FORGE_METRICS_PORT": str(self.metrics_port),
            "FORGE_WORKERS": "8",
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        command = [str(Path(sys.executable).with_name("forge-operator"))]
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self._healthy, timeout=timeout, what="the operator's /healthz", context=self.log_tail)

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"operator exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no operator log)"
        return "operator log (tail):\n" + "\n".join(text[-lines:])


# A ForgeJob's pod-template and gang settings with every field of issue 12 items 4 and 5 (merged into "resources" /
# set as "scheduling" and "envFrom"): the render tests and the server-side dry runs share it.
POD_TEMPLATE_RESOURCES: dict[str, Any] = {
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "cloud.example/gpu", "operator": "In", "values": ["h100", "a100"]}]}
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "preference": {"matchExpressions": [{"key": "gpu-count", "operator": "Gt", "values": ["7"]}]},
                }
            ],
        },
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {"forge.dev/forgejob": "dry"}},
                        "topologyKey": "topology.kubernetes.io/zone",
                    },
                }
            ]
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchExpressions": [{"key": "forge.dev/forgejob", "operator": "In", "values": ["dry"]}]
                    },
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        },
    },
    "volumes": [
        {"name": "dataset", "persistentVolumeClaim": {"claimName": "tickets-2025", "readOnly": True}},
        {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
        {"name": "ca", "configMap": {"name": "corp-ca"}},
        {"name": "creds", "secret": {"secretName": "s3-creds", "optional": True}},
        {"name": "spill", "emptyDir": {"sizeLimit": "10Gi"}},
    ],
    "volumeMounts": [
        {"name": "dataset", "mountPath": "/data/tickets", "readOnly": True},
        {"name": "hf-cache", "mountPath": "/cache/hf", "subPath": "team-a"},
        {"name": "ca", "mountPath": "/etc/ssl/corp", "readOnly": True},
        {"name": "creds", "mountPath": "/var/run/creds", "readOnly": True},
        {"name": "spill", "mountPath": "/spill"},
    ],
    "podLabels": {"team": "nlp", "cost-center": "r-42"},
    "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false", "prometheus.io/scrape": "true"},
}
POD_TEMPLATE_ENV_FROM: list[dict[str, Any]] = [
    {"secretRef": {"name": "s3-creds"}},
    {"prefix": "HF_", "configMapRef": {"name": "hf-settings", "optional": True}},
]
GANG_SCHEDULING: dict[str, Any] = {
    "schedulerName": "volcano",
    "priorityClassName": "batch-low",
    "gang": {"queue": "research", "scheduleTimeoutSeconds": 600},
}
