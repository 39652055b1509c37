"""Fixtures for the stand-in tests: a stand-in running in a thread against the real local control plane."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, watch

from forge_dev.standin import StandInSettings, standin_thread
from tests.conftest import LocalCluster

PROBE = Path(__file__).with_name("probe.py")
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
T = TypeVar("T")


def wait_until(check: Callable[[], T | None], what: str, timeout_s: float = 30.0, interval_s: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def probe_command(*args: str) -> list[str]:
    """``python probe.py ...``: ``python`` is resolved on the PATH the stand-in gives (the venv's bin first)."""
    return ["python", str(PROBE), *args]


def template(args: list[str], **pod_spec: Any) -> dict[str, Any]:
    """A pod template whose ``pytorch`` container runs the probe with ``args``."""
    container: dict[str, Any] = {
        "name": "pytorch",
        "image": "forge-trainer:dev",
        "command": probe_command(),
        "args": args,
    }
    container.update(pod_spec.pop("container", {}))
    labels = pod_spec.pop("labels", {})
    return {"metadata": {"labels": labels}, "spec": {"containers": [container], **pod_spec}}


def replica_spec(tmpl: dict[str, Any], replicas: int = 1, restart_policy: str = "OnFailure") -> dict[str, Any]:
    return {"replicas": replicas, "restartPolicy": restart_policy, "template": tmpl}


def conditions(job: dict[str, Any]) -> dict[str, str]:
    """``{type: status}`` of a job's conditions."""
    return {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}


def condition(job: dict[str, Any], ctype: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] == ctype]
    assert found, f"no {ctype} condition in {job.get('status')}"
    return found[0]


@dataclass
class ConditionHistory:
    """Every distinct set of True conditions a job went through, in order, from a watch."""

    seen: list[tuple[str, ...]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, job: dict[str, Any]) -> None:
        true = tuple(ctype for ctype, status in conditions(job).items() if status == "True")
        with self._lock:
            if not self.seen or self.seen[-1] != true:
                self.seen.append(true)

    def first(self, ctype: str) -> int | None:
        with self._lock:
            return next((i for i, true in enumerate(self.seen) if ctype in true), None)


@dataclass
class Harness:
    """What a stand-in test needs: API clients, its namespace, the stand-in's workdir and a probe output dir."""

    cluster: LocalCluster
    api: client.ApiClient
    namespace: str
    workdir: Path
    out: Path
    settings: StandInSettings
    _watchers: list[watch.Watch] = field(default_factory=list)
    _clients: list[client.ApiClient] = field(default_factory=list)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def objects(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def create_job(
        self,
        name: str,
        replicas: dict[str, dict[str, Any]],
        run_policy: dict[str, Any] | None = None,
        nproc_per_node: str | None = None,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"pytorchReplicaSpecs": replicas}
        if run_policy is not None:
            spec["runPolicy"] = run_policy
        if nproc_per_node is not None:
            spec["nprocPerNode"] = nproc_per_node
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob", "metadata": {"name": name}, "spec": spec}
        return dict(self.objects.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body))

    def job(self, name: str) -> dict[str, Any]:
        return dict(self.objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name))

    def patch_job(self, name: str, patch: dict[str, Any]) -> None:
        self.objects.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, patch)

    def wait_job(
        self, name: str, check: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            job = self.job(name)
            return job if check(job) else None

        return wait_until(probe, f"{name}: {what}", timeout_s)

    def wait_condition(self, name: str, ctype: str, status: str = "True", timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait_job(name, lambda job: conditions(job).get(ctype) == status, f"{ctype}={status}", timeout_s)

    def record(self, rank: int | str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The probe's record of rank ``rank`` (waits for it)."""
        path = self.out / f"record-{rank}.json"
        wait_until(path.exists, f"probe record of rank {rank}", timeout_s)
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def starts(self, rank: int | str) -> list[int]:
        path = self.out / f"starts-{rank}.txt"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def probe_pids(self) -> list[int]:
        pids = [pid for path in self.out.glob("starts-*.txt") for pid in map(int, path.read_text().split())]
        for path in self.out.glob("record-*.json"):
            child = json.loads(path.read_text()).get("child_pid")
            if child:
                pids.append(int(child))
        return pids

    def history(self, name: str) -> ConditionHistory:
        """Start recording the condition sets job ``name`` goes through (call before creating it)."""
        history = ConditionHistory()
        stream = watch.Watch()
        self._watchers.append(stream)
        api = self.cluster.api_client()
        self._clients.append(api)
        objects = client.CustomObjectsApi(api)
        selector = f"metadata.name={name}"
        # Watch from a resourceVersion taken now, so no event after this call is missed however late the
        # watch connects.
        listed = objects.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, field_selector=selector)
        since = listed["metadata"]["resourceVersion"]

        def follow() -> None:
            try:
                for event in stream.stream(
                    objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    field_selector=selector,
                    resource_version=since,
                    timeout_seconds=120,
                ):
                    history.add(event["object"])
            except Exception:  # the test is over (client closed): nothing more to record
                return

        threading.Thread(target=follow, daemon=True).start()
        return history

    def stop_watchers(self) -> None:
        for stream in self._watchers:
            stream.stop()
        for api in self._clients:
            api.close()


@pytest.fixture
def standin(cluster: LocalCluster, namespace: str, tmp_path: Path) -> Iterator[Harness]:
    """A stand-in for ``namespace`` running in a thread; afterwards no process it started may be alive."""
    settings = StandInSettings(
        workdir=tmp_path / "standin",
        namespace=namespace,
        poll_interval_s=0.1,
        restart_delay_s=0.5,
        retry_start_s=0.3,
        stop_grace_cap_s=5.0,
        drain_s=1.0,
        path_prefix=(str(Path(sys.executable).parent),),
    )
    with cluster.api_client() as api:
        harness = Harness(cluster, api, namespace, settings.workdir, tmp_path / "out", settings)
        harness.out.mkdir()
        try:
            with standin_thread(api, settings):
                yield harness
        finally:
            harness.stop_watchers()
        leftovers = [pid for pid in harness.probe_pids() if pid_alive(pid)]
        assert not leftovers, f"processes left running after the stand-in stopped: {leftovers}"
