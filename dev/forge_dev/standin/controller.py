"""The reconcile loop: PyTorchJobs in the API server -> local processes -> PyTorchJob status.

Level-based: every pass compares what the API says (the listed PyTorchJobs) with what runs here (the processes
the stand-in started) and acts on the difference, so a missed event costs at most one resync period. A watch only
wakes the loop early. One thread does all the work; ``stop()`` may be called from any thread or signal handler.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from forge_dev.controlplane import free_port, port_is_free
from forge_dev.kubeconfig import ClusterAccess, kubeconfig_text, write_kubeconfig
from forge_dev.standin import logs, trainjob
from forge_dev.standin.credentials import request_token
from forge_dev.standin.environment import (
    PodFields,
    Rendezvous,
    base_environment,
    checkpoint_dir_environment,
    command_line,
    container_environment,
    kubeflow_environment,
    process_environment,
)
from forge_dev.standin.pods import pod_gone, pod_manifest
from forge_dev.standin.policy import backoff_exhausted, is_retryable, past_active_deadline, restart_delay
from forge_dev.standin.processes import LocalProcess, log_line, spawn, stop_processes, sweep
from forge_dev.standin.references import ApiObjectSource, ReplicaStartError
from forge_dev.standin.spec import (
    GROUP,
    MASTER,
    PLURAL,
    VERSION,
    WORKER,
    JobSpecError,
    PyTorchJob,
    ReplicaId,
    nproc_per_node,
    parse_job,
    pod_labels,
    pytorch_container,
    replica_ids,
    service_account_name,
    world_size,
)
from forge_dev.standin.status import (
    FAILED,
    SUCCEEDED,
    Observation,
    Outcome,
    ReplicaCounts,
    backoff_message,
    deadline_message,
    failed_replicas_message,
    is_finished,
    next_status,
    reason,
    restarting_message,
    succeeded_message,
    utc_now,
)
from forge_dev.standin.volumes import PathRewriter, VolumeLayout, materialise_mounts

LOG = logging.getLogger("forge_dev.standin")

Key = tuple[str, str]
DEFAULT_GRACE_S = 30


@dataclass(frozen=True)
class StandInSettings:
    """Tunables of the stand-in. Only ``workdir`` is required."""

    workdir: Path
    namespace: str | None = None  # None: every namespace
    poll_interval_s: float = 0.2  # how often process exits are checked
    resync_interval_s: float = 5.0  # full re-list even without watch events
    restart_delay_s: float = 0.5  # first restart delay, doubling per restart of the job
    restart_delay_cap_s: float = 30.0
    retry_start_s: float = 2.0  # retry of a replica that could not start (missing ConfigMap, ...)
    stop_grace_cap_s: float = 10.0  # upper bound on terminationGracePeriodSeconds
    drain_s: float = 5.0  # once the Master succeeded, how long other replicas may finish by themselves
    token_expiration_s: int = 24 * 3600
    remap_metrics_ports: bool = True  # off: every replica keeps its `metrics` container port (one replica per host)
    create_pods: bool = True  # a Pod object per replica attempt; deleting it restarts the replica (see pods.py)
    path_prefix: tuple[str, ...] = field(default_factory=lambda: (str(Path(sys.executable).parent),))


# Pods have their own network namespace in a cluster; here every replica shares loopback, so the container port named
# `metrics` gets a free local port per replica, passed in the variable the Forge trainer reads to override its
# configured port (see docs/standin.md).
METRICS_PORT_NAME = "metrics"
METRICS_PORT_ENV = "FORGE_METRICS_PORT"


class ReplicaPhase(StrEnum):
    PENDING = "Pending"  # not started yet, waiting for a restart, or waiting for its references
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPED = "Stopped"  # stopped by the stand-in (job ended, suspended, deleted, shutdown)


@dataclass
class ReplicaRuntime:
    replica: ReplicaId
    phase: ReplicaPhase = ReplicaPhase.PENDING
    processes: list[LocalProcess] = field(default_factory=list)
    attempts: int = 0
    exit_code: int | None = None
    not_before: float = 0.0
    restart_pending: bool = False
    stopped_after_success: bool = False
    last_error: str = ""
    metrics_port: int | None = None  # the local port standing in for the container's `metrics` port
    pod_uid: str | None = None  # the Pod object of the running attempt (StandInSettings.create_pods)
    pod_created_at: float = 0.0


@dataclass
class JobRuntime:
    namespace: str
    name: str
    uid: str
    master_port: int
    grace_s: float
    replicas: dict[str, ReplicaRuntime]
    restarts: int = 0
    restart_message: str | None = None
    outcome: Outcome | None = None

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    def processes(self) -> list[LocalProcess]:
        return [proc for replica in self.replicas.values() for proc in replica.processes]


@dataclass
class Draining:
    """Processes of a finished job's replica, given ``drain_s`` to exit by themselves before being stopped."""

    replica: str
    log: Path
    processes: list[LocalProcess]
    deadline: float
    grace_s: float


@dataclass(frozen=True)
class Launch:
    """Everything needed to start a replica's processes (one argv/env per local rank)."""

    cwd: Path
    ranks: list[tuple[list[str], dict[str, str]]]


def _grace_seconds(job: PyTorchJob, cap_s: float) -> float:
    periods = [
        spec.template.spec.termination_grace_period_seconds
        for spec in job.spec.pytorch_replica_specs.values()
        if spec.template.spec.termination_grace_period_seconds is not None
    ]
    return float(min(cap_s, max(periods) if periods else DEFAULT_GRACE_S))


def free_port_block(count: int) -> int:
    """A base port such that base .. base+count-1 are free on 127.0.0.1 right now (one per local rank)."""
    for _ in range(50):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        if all(port_is_free(base + offset) for offset in range(1, count)):
            return base
    raise ReplicaStartError(f"no block of {count} free local ports for the metrics endpoints")


def working_directory(working_dir: str | None, rewrite: PathRewriter, replica_dir: Path) -> Path:
    """The container's workingDir when it maps to an existing local folder, else the replica's folder."""
    if working_dir:
        mapped = Path(rewrite(working_dir))
        if mapped.is_dir():
            return mapped
    return replica_dir


def observe(job: PyTorchJob, runtime: JobRuntime | None, suspended: bool) -> Observation:
    """Replica counts and job-level facts for the status, from the local processes."""
    counts: dict[str, ReplicaCounts] = {}
    replicas = list(runtime.replicas.values()) if runtime else []
    for rtype in job.spec.pytorch_replica_specs:
        mine = [r for r in replicas if r.replica.rtype == rtype]
        counts[rtype] = ReplicaCounts(
            active=sum(r.phase is ReplicaPhase.RUNNING for r in mine),
            succeeded=sum(
                r.phase is ReplicaPhase.SUCCEEDED or (r.phase is ReplicaPhase.STOPPED and r.stopped_after_success)
                for r in mine
            ),
            failed=sum(r.phase is ReplicaPhase.FAILED for r in mine),
        )
    if runtime is None:
        return Observation(job.metadata.name, counts, suspended=suspended)
    lead = MASTER if MASTER in job.spec.pytorch_replica_specs else WORKER
    restarting = any(r.restart_pending for r in replicas)
    return Observation(
        job_name=job.metadata.name,
        replicas=counts,
        running=any(r.phase is ReplicaPhase.RUNNING for r in replicas if r.replica.rtype == lead),
        restarting_message=runtime.restart_message if restarting and runtime.outcome is None else None,
        outcome=runtime.outcome,
        suspended=suspended,
    )


def success_outcome(job: PyTorchJob, runtime: JobRuntime) -> Outcome | None:
    """Kubeflow's success policy: the job succeeds when its Master succeeded (without a Master: every Worker)."""
    lead = MASTER if MASTER in job.spec.pytorch_replica_specs else WORKER
    leads = [r for r in runtime.replicas.values() if r.replica.rtype == lead]
    if leads and all(r.phase is ReplicaPhase.SUCCEEDED for r in leads):
        return Outcome(SUCCEEDED, succeeded_message(job.metadata.name))
    return None


def _elapsed_since(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    started = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - started).total_seconds()


@dataclass(frozen=True)
class JobKind:
    """The kind of job one stand-in runs: Kubeflow's PyTorchJob (training-operator) or TrainJob (Trainer v2)."""

    kind: str
    group: str
    version: str
    plural: str


PYTORCHJOB_KIND = JobKind("PyTorchJob", GROUP, VERSION, PLURAL)
TRAINJOB_KIND = JobKind(trainjob.KIND, trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL)
KINDS = {kind.kind: kind for kind in (PYTORCHJOB_KIND, TRAINJOB_KIND)}


class TrainingOperatorStandIn:
    """The local stand-in for Kubeflow's training-operator (or Trainer v2) + kubelet. See docs/standin.md."""

    def __init__(self, api_client: client.ApiClient, settings: StandInSettings, kind: str = "PyTorchJob") -> None:
        # Absolute, because every process runs in its own working directory and is given paths under it.
        self.settings = replace(settings, workdir=settings.workdir.resolve())
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._objects = client.CustomObjectsApi(api_client)
        self._access = ClusterAccess.from_api_client(api_client)
        self._base_env = base_environment(os.environ, self.settings.path_prefix)
        self._jobs: dict[Key, dict[str, Any]] = {}
        self._runtimes: dict[Key, JobRuntime] = {}
        self._saved_states: dict[Key, dict[str, Any]] = {}
        self._draining: list[Draining] = []
        self._pods: dict[Key, tuple[str, bool]] = {}  # (namespace, pod name) -> (uid, being deleted)
        self._pods_listed_at = float("-inf")
        self._kind = KINDS[kind]
        self._trainer_v2 = self._kind is TRAINJOB_KIND
        self._nproc_env: dict[Key, int] = {}  # TrainJobs: PET_NPROC_PER_NODE (torchrun starts the local ranks)
        # Pod objects stand for PyTorchJob replicas only (their labels and owner are the training-operator's); a
        # TrainJob's pods would belong to JobSet's Jobs, which the stand-in does not model.
        self._creates_pods = self.settings.create_pods and not self._trainer_v2
        self._wake = threading.Event()
        self._stopping = threading.Event()

    # ----- lifecycle -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end; it stops every process it started before ``run()`` returns."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> None:
        """Reconcile until ``stop()``; then stop every child process."""
        settings = self.settings
        settings.workdir.mkdir(parents=True, exist_ok=True)
        LOG.info(
            "stand-in watching %ss in %s; files under %s",
            self._kind.kind,
            settings.namespace or "all namespaces",
            settings.workdir,
        )
        watcher = threading.Thread(target=self._watch, name="standin-watch", daemon=True)
        watcher.start()
        next_list = 0.0
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                if self._wake.is_set() or now >= next_list:
                    self._wake.clear()
                    self._refresh()
                    next_list = now + settings.resync_interval_s
                self._reconcile_all()
                self._wake.wait(settings.poll_interval_s)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        runtimes = list(self._runtimes.values())
        draining = [p for d in self._draining for p in d.processes]
        stop_processes([*draining, *(p for r in runtimes for p in r.processes())], self.settings.stop_grace_cap_s)
        for entry in self._draining:
            log_line(entry.log, f"stopped {entry.replica}: the stand-in is shutting down")
        self._draining = []
        for runtime in runtimes:
            self._forget(runtime.key, "the stand-in is shutting down")
        LOG.info("stand-in stopped; no process left running")

    # ----- API --------------------------------------------------------------------------------------------------

    def _list(self, **kwargs: Any) -> dict[str, Any]:
        if self.settings.namespace:
            result = self._objects.list_namespaced_custom_object(
                self._kind.group, self._kind.version, self.settings.namespace, self._kind.plural, **kwargs
            )
        else:
            result = self._objects.list_cluster_custom_object(
                self._kind.group, self._kind.version, self._kind.plural, **kwargs
            )
        return dict(result)

    def _watch(self) -> None:
        """Wake the loop on every PyTorchJob event (the loop re-lists: events carry no decisions)."""
        while not self._stopping.is_set():
            stream = watch.Watch()
            try:
                if self.settings.namespace:
                    events = stream.stream(
                        self._objects.list_namespaced_custom_object,
                        self._kind.group,
                        self._kind.version,
                        self.settings.namespace,
                        self._kind.plural,
                        timeout_seconds=10,
                    )
                else:
                    events = stream.stream(
                        self._objects.list_cluster_custom_object,
                        self._kind.group,
                        self._kind.version,
                        self._kind.plural,
                        timeout_seconds=10,
                    )
                for _event in events:
                    self._wake.set()
                    if self._stopping.is_set():
                        stream.stop()
            except Exception as error:  # the loop's resync covers any gap; just retry
                LOG.debug("watch interrupted: %s", error)
                self._stopping.wait(1.0)

    def _refresh(self) -> None:
        try:
            listing = self._list()
        except ApiException as error:
            if error.status == 404:  # the CRD is not installed: nothing of this kind to run
                LOG.debug("%ss are not served: %s", self._kind.kind, error.reason)
            else:
                LOG.warning("cannot list %ss (keeping the last known list): %s", self._kind.kind, error)
            return
        except Exception as error:
            LOG.warning("cannot list %ss (keeping the last known list): %s", self._kind.kind, error)
            return
        self._jobs = {
            (item["metadata"]["namespace"], item["metadata"]["name"]): item for item in listing.get("items", [])
        }
        if self._creates_pods:
            self._refresh_pods()

    def _refresh_pods(self) -> None:
        """The replicas' Pod objects as the API has them now (a deleted one restarts its replica)."""
        started = time.monotonic()
        selector = "training.kubeflow.org/job-name"
        try:
            if self.settings.namespace:
                pods = self._core.list_namespaced_pod(self.settings.namespace, label_selector=selector)
            else:
                pods = self._core.list_pod_for_all_namespaces(label_selector=selector)
        except Exception as error:
            LOG.warning("cannot list pods (keeping the last known list): %s", error)
            return
        self._pods = {
            (pod.metadata.namespace, pod.metadata.name): (pod.metadata.uid, pod.metadata.deletion_timestamp is not None)
            for pod in pods.items
        }
        self._pods_listed_at = started

    def _write_status(self, key: Key, obj: dict[str, Any], status: dict[str, Any]) -> bool:
        namespace, name = key
        body = {**obj, "status": status}
        try:
            updated = self._objects.replace_namespaced_custom_object_status(
                self._kind.group, self._kind.version, namespace, self._kind.plural, name, body
            )
        except ApiException as error:
            if error.status in (404, 409):  # gone, or changed since listed: re-list and decide again
                self._wake.set()
                return False
            raise
        self._jobs[key] = dict(updated)
        return True

    # ----- reconcile --------------------------------------------------------------------------------------------

    def _reconcile_all(self) -> None:
        self._drain()
        for key in [key for key in self._runtimes if key not in self._jobs]:
            self._forget(key, "the PyTorchJob was deleted")
        for key, obj in list(self._jobs.items()):
            try:
                self._reconcile(key, obj)
            except Exception:
                LOG.exception("reconciling PyTorchJob %s/%s failed; will retry", *key)

    def _reconcile(self, key: Key, obj: dict[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        status: dict[str, Any] = obj.get("status") or {}
        runtime = self._runtimes.get(key)
        if runtime is not None and runtime.uid != metadata.get("uid"):
            self._forget(key, "a new PyTorchJob of the same name replaced the old one")
            runtime = None
        if metadata.get("deletionTimestamp"):
            if runtime is not None:
                self._forget(key, "the PyTorchJob is being deleted")
            return
        finished = trainjob.is_finished if self._trainer_v2 else is_finished
        if finished(status.get("conditions") or []):
            if runtime is not None:
                self._forget(key, f"the {self._kind.kind} has finished")
            return
        try:
            job = self._parse(key, obj)
        except JobSpecError as error:
            self._write_invalid(key, obj, status, str(error))
            return
        suspended = job.spec.run_policy.suspend
        if suspended:
            if runtime is not None:
                self._forget(key, "the PyTorchJob is suspended")
                runtime = None
        else:
            runtime = runtime or self._new_runtime(job)
            self._advance(job, runtime, status)
        observation = observe(job, runtime, suspended)
        new_status = self._next_status(status, observation)
        written = new_status == status or self._write_status(key, obj, new_status)
        if runtime is not None:
            self._save_state(runtime)
            if written and runtime.outcome is not None:
                LOG.info("PyTorchJob %s/%s: %s", *key, runtime.outcome.message)
                del self._runtimes[key]

    def _parse(self, key: Key, obj: dict[str, Any]) -> PyTorchJob:
        """The job in the stand-in's model; a TrainJob with its ClusterTrainingRuntime read from the API."""
        if not self._trainer_v2:
            return parse_job(obj)
        name = trainjob.runtime_name(obj)
        try:
            runtime = self._objects.get_cluster_custom_object(
                trainjob.GROUP, trainjob.VERSION, trainjob.RUNTIME_PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                raise JobSpecError(f"ClusterTrainingRuntime {name!r} not found") from None
            raise
        self._nproc_env[key] = trainjob.num_proc_per_node(obj, runtime)
        return trainjob.as_pytorchjob(obj, runtime)

    def _next_status(self, status: dict[str, Any], observation: Observation) -> dict[str, Any]:
        if self._trainer_v2:
            return trainjob.next_status(status, observation, utc_now())
        return next_status(status, observation, utc_now())

    def _advance(self, job: PyTorchJob, runtime: JobRuntime, status: dict[str, Any]) -> None:
        """One step of the job's processes: collect exits, apply the policies, start what is due."""
        if runtime.outcome is None:
            self._restart_deleted_pods(job, runtime)
        if runtime.outcome is None:
            self._collect_exits(job, runtime)
        if runtime.outcome is None:
            runtime.outcome = success_outcome(job, runtime)
        if runtime.outcome is None and past_active_deadline(
            _elapsed_since(status.get("startTime")), job.spec.run_policy.active_deadline_seconds
        ):
            runtime.outcome = Outcome(FAILED, deadline_message(job.metadata.name))
        if runtime.outcome is None:
            self._start_due(job, runtime)
        if runtime.outcome is not None:
            self._stop_replicas(runtime, after_success=runtime.outcome.ctype == SUCCEEDED)

    def _new_runtime(self, job: PyTorchJob) -> JobRuntime:
        runtime = JobRuntime(
            namespace=job.metadata.namespace,
            name=job.metadata.name,
            uid=job.metadata.uid,
            master_port=free_port(),
            grace_s=_grace_seconds(job, self.settings.stop_grace_cap_s),
            replicas={replica.name: ReplicaRuntime(replica) for replica in replica_ids(job.spec)},
        )
        self._runtimes[runtime.key] = runtime
        LOG.info(
            "PyTorchJob %s/%s: %d replica(s), MASTER_PORT %d", *runtime.key, len(runtime.replicas), runtime.master_port
        )
        return runtime

    def _restart_deleted_pods(self, job: PyTorchJob, runtime: JobRuntime) -> None:
        """A running replica whose Pod was deleted is stopped and started again (not counted as a failure), as the
        training operator re-creates a deleted pod. Judged only from a pod listing newer than the Pod."""
        for replica in runtime.replicas.values():
            if replica.phase is not ReplicaPhase.RUNNING or replica.pod_uid is None:
                continue
            if self._pods_listed_at <= replica.pod_created_at:
                continue
            pod_name = replica.replica.pod_name(job.metadata.name)
            if not pod_gone(self._pods, runtime.namespace, pod_name, replica.pod_uid):
                continue
            log_line(self._log_path(runtime, replica), f"pod {pod_name} was deleted: restarting {replica.replica.name}")
            LOG.info("PyTorchJob %s/%s: pod %s was deleted: restarting its replica", *runtime.key, pod_name)
            stop_processes(replica.processes, runtime.grace_s)
            replica.processes = []
            replica.pod_uid = None
            replica.phase = ReplicaPhase.PENDING
            replica.not_before = time.monotonic()

    def _create_pod(self, job: PyTorchJob, runtime: JobRuntime, replica: ReplicaRuntime) -> None:
        """The Pod object of a replica attempt (replacing the previous attempt's); best effort: a refusal is logged
        and the replica runs without one."""
        rid = replica.replica
        rspec = job.spec.pytorch_replica_specs[rid.rtype]
        container = pytorch_container(rspec, rid.rtype)
        pod_name = rid.pod_name(job.metadata.name)
        labels = pod_labels(job.metadata.name, rid, rspec.template.metadata.labels)
        manifest = pod_manifest(job, pod_name, labels, container.name, container.image, service_account_name(rspec))
        replica.pod_created_at = time.monotonic()
        try:
            try:
                created = self._core.create_namespaced_pod(runtime.namespace, manifest)
            except ApiException as error:
                if error.status != 409:
                    raise
                self._core.delete_namespaced_pod(pod_name, runtime.namespace, grace_period_seconds=0)
                created = self._core.create_namespaced_pod(runtime.namespace, manifest)
        except ApiException as error:
            LOG.warning("PyTorchJob %s/%s: cannot create pod %s: %s", *runtime.key, pod_name, error.reason)
            replica.pod_uid = None
            return
        replica.pod_uid = created.metadata.uid

    def _collect_exits(self, job: PyTorchJob, runtime: JobRuntime) -> None:
        for replica in runtime.replicas.values():
            if replica.phase is not ReplicaPhase.RUNNING:
                continue
            code = self._replica_exit_code(replica, runtime.grace_s)
            if code is not None:
                self._on_exit(job, runtime, replica, code)
            if runtime.outcome is not None:
                return

    @staticmethod
    def _replica_exit_code(replica: ReplicaRuntime, grace_s: float) -> int | None:
        """The replica's exit code once it is over: 0 when every local rank exited 0, else the first failure
        (the other local ranks are then stopped, as torchrun does)."""
        codes = [proc.exit_code() for proc in replica.processes]
        failures = [code for code in codes if code not in (None, 0)]
        if failures:
            stop_processes(replica.processes, grace_s)
            return failures[0]
        if all(code == 0 for code in codes):
            for proc in replica.processes:
                sweep(proc)
            return 0
        return None

    def _on_exit(self, job: PyTorchJob, runtime: JobRuntime, replica: ReplicaRuntime, code: int) -> None:
        """Apply restartPolicy and backoffLimit to a replica that just ended."""
        replica.processes = []
        replica.exit_code = code
        log_line(self._log_path(runtime, replica), f"{replica.replica.name} exited with code {code}")
        if code == 0:
            replica.phase = ReplicaPhase.SUCCEEDED
            return
        rtype = replica.replica.rtype
        name = job.metadata.name
        if is_retryable(job.spec.pytorch_replica_specs[rtype].restart_policy, code):
            if backoff_exhausted(runtime.restarts, job.spec.run_policy.backoff_limit):
                replica.phase = ReplicaPhase.FAILED
                runtime.outcome = Outcome(FAILED, backoff_message(name))
                return
            runtime.restarts += 1
            replica.phase = ReplicaPhase.PENDING
            replica.restart_pending = True
            delay = restart_delay(runtime.restarts, self.settings.restart_delay_s, self.settings.restart_delay_cap_s)
            replica.not_before = time.monotonic() + delay
            runtime.restart_message = restarting_message(name, 1, rtype)
            LOG.info(
                "PyTorchJob %s/%s: restarting %s in %.1f s (restart %d)",
                *runtime.key,
                replica.replica.name,
                delay,
                runtime.restarts,
            )
            return
        replica.phase = ReplicaPhase.FAILED
        failed = sum(r.phase is ReplicaPhase.FAILED for r in runtime.replicas.values() if r.replica.rtype == rtype)
        runtime.outcome = Outcome(FAILED, failed_replicas_message(name, failed, rtype))

    def _start_due(self, job: PyTorchJob, runtime: JobRuntime) -> None:
        now = time.monotonic()
        for replica in runtime.replicas.values():
            if replica.phase is ReplicaPhase.PENDING and replica.not_before <= now:
                self._start_replica(job, runtime, replica)
            if runtime.outcome is not None:
                return

    def _start_replica(self, job: PyTorchJob, runtime: JobRuntime, replica: ReplicaRuntime) -> None:
        log = self._log_path(runtime, replica)
        try:
            launch = self._prepare(job, runtime, replica)
        except (ReplicaStartError, ApiException) as error:
            message = (
                str(error) if isinstance(error, ReplicaStartError) else f"API error {error.status}: {error.reason}"
            )
            if message != replica.last_error:
                log_line(log, f"cannot start {replica.replica.name} yet: {message} (retrying)")
                LOG.warning("PyTorchJob %s/%s: cannot start %s yet: %s", *runtime.key, replica.replica.name, message)
            replica.last_error = message
            replica.not_before = time.monotonic() + self.settings.retry_start_s
            return
        replica.attempts += 1
        replica.last_error = ""
        argv = launch.ranks[0][0]
        log_line(
            log,
            f"starting {replica.replica.name} (attempt {replica.attempts}, {len(launch.ranks)} process(es)): {argv}",
        )
        try:
            for local_rank, (rank_argv, env) in enumerate(launch.ranks):
                replica.processes.append(spawn(rank_argv, env, launch.cwd, log, local_rank))
        except OSError as error:
            log_line(log, f"cannot run {argv[0]!r}: {error}")
            stop_processes(replica.processes, 0)
            self._on_exit(job, runtime, replica, 127)
            return
        replica.phase = ReplicaPhase.RUNNING
        replica.restart_pending = False
        replica.exit_code = None
        if self._creates_pods:
            self._create_pod(job, runtime, replica)
        if not any(r.restart_pending for r in runtime.replicas.values()):
            runtime.restart_message = None

    def _prepare(self, job: PyTorchJob, runtime: JobRuntime, replica: ReplicaRuntime) -> Launch:
        """Resolve references, materialise volumes and credentials: the replica's argv/env per local rank."""
        rid = replica.replica
        rspec = job.spec.pytorch_replica_specs[rid.rtype]
        container = pytorch_container(rspec, rid.rtype)
        namespace = job.metadata.namespace
        folder = logs.job_dir(self.settings.workdir, namespace, job.metadata.name) / rid.name
        source = ApiObjectSource(self._core, namespace)
        account = service_account_name(rspec)
        pod = PodFields(
            name=rid.pod_name(job.metadata.name),
            namespace=namespace,
            uid=str(uuid.uuid4()),
            service_account=account,
            labels=pod_labels(job.metadata.name, rid, rspec.template.metadata.labels),
            annotations=rspec.template.metadata.annotations,
        )
        layout = VolumeLayout(replica_dir=folder, claims_dir=self.settings.workdir / namespace / "pvc")
        rewrite = PathRewriter(
            materialise_mounts(rspec.template.spec, container, layout, source, replica.attempts == 0)
        )
        container_env = container_environment(container, source, pod)
        token = request_token(self._core, namespace, account, self.settings.token_expiration_s)
        kubeconfig = folder / "kubeconfig"
        write_kubeconfig(
            kubeconfig, kubeconfig_text(self._access, token, namespace, f"system:serviceaccount:{namespace}:{account}")
        )
        nproc = nproc_per_node(job.spec)
        # A TrainJob's trainer container declares no metrics port (v2.3.0 cannot carry one); its ranks listen anyway.
        local_ranks = self._nproc_env.get(runtime.key, 1) if self._trainer_v2 else nproc
        declared = any(p.name == METRICS_PORT_NAME for p in container.ports) or self._trainer_v2
        wants_port = self.settings.remap_metrics_ports and declared
        if replica.metrics_port is None and wants_port:
            replica.metrics_port = free_port_block(local_ranks)
        ranks: list[tuple[list[str], dict[str, str]]] = []
        for local_rank in range(nproc):
            rendezvous = Rendezvous(
                master_port=runtime.master_port,
                world_size=world_size(job.spec),
                nnodes=len(runtime.replicas),
                node_rank=rid.node_rank,
                nproc_per_node=nproc,
                local_rank=local_rank,
            )
            injected = (
                trainjob.torch_environment(len(runtime.replicas), local_ranks, rid.node_rank, runtime.master_port)
                if self._trainer_v2
                else kubeflow_environment(rendezvous)
            )
            argv = command_line(container, {**container_env, **dict(injected)}, rewrite)
            env = process_environment(self._base_env, container_env, injected, rewrite, str(kubeconfig))
            env.update(checkpoint_dir_environment(container_env, rewrite, str(folder)))  # one staging dir per pod
            if replica.metrics_port is not None:
                env[METRICS_PORT_ENV] = str(replica.metrics_port)  # each local rank adds its LOCAL_RANK
            ranks.append((argv, env))
        folder.mkdir(parents=True, exist_ok=True)
        return Launch(working_directory(container.working_dir, rewrite, folder), ranks)

    def _stop_replicas(self, runtime: JobRuntime, after_success: bool) -> None:
        """End every replica still running or waiting (the job has ended).

        After a success, running replicas get ``drain_s`` to exit by themselves (e.g. to finish writing their
        shard of the last checkpoint); after a failure they are stopped at once.
        """
        running = [r for r in runtime.replicas.values() if r.phase is ReplicaPhase.RUNNING]
        processes = {replica.replica.name: replica.processes for replica in running}
        for replica in runtime.replicas.values():
            if replica.phase in (ReplicaPhase.RUNNING, ReplicaPhase.PENDING):
                replica.processes = []
                replica.phase = ReplicaPhase.STOPPED
                replica.restart_pending = False
                replica.stopped_after_success = after_success
        # state.json says Stopped before any process is signalled: whoever sees a process gone reads a final state.
        self._save_state(runtime)
        if after_success and self.settings.drain_s > 0:
            deadline = time.monotonic() + self.settings.drain_s
            for replica in running:
                log = self._log_path(runtime, replica)
                log_line(
                    log, f"the job has ended: {replica.replica.name} may finish within {self.settings.drain_s:g} s"
                )
                draining = Draining(
                    replica.replica.name, log, processes[replica.replica.name], deadline, runtime.grace_s
                )
                self._draining.append(draining)
        else:
            stop_processes([p for procs in processes.values() for p in procs], runtime.grace_s)
            for replica in running:
                log_line(self._log_path(runtime, replica), f"stopped {replica.replica.name}: the job has ended")

    def _drain(self) -> None:
        """Reap replicas of finished jobs that exited by themselves; stop those past their drain deadline."""
        now = time.monotonic()
        still: list[Draining] = []
        for entry in self._draining:
            codes = [proc.exit_code() for proc in entry.processes]
            if all(code is not None for code in codes):
                for proc in entry.processes:
                    sweep(proc)
                log_line(
                    entry.log, f"{entry.replica} exited with code {max(c or 0 for c in codes)} after the job ended"
                )
            elif now >= entry.deadline:
                stop_processes(entry.processes, entry.grace_s)
                log_line(entry.log, f"stopped {entry.replica}: the job has ended")
            else:
                still.append(entry)
        self._draining = still

    def _forget(self, key: Key, why: str) -> None:
        """Stop a job's processes and drop what the stand-in knows about it."""
        runtime = self._runtimes.pop(key, None)
        if runtime is None:
            return
        stop_processes(runtime.processes(), runtime.grace_s)
        for replica in runtime.replicas.values():
            if replica.phase is ReplicaPhase.RUNNING:
                log_line(self._log_path(runtime, replica), f"stopped {replica.replica.name}: {why}")
            if replica.phase in (ReplicaPhase.RUNNING, ReplicaPhase.PENDING):
                replica.phase = ReplicaPhase.STOPPED
            replica.processes = []
        self._save_state(runtime)
        self._saved_states.pop(key, None)
        LOG.info("PyTorchJob %s/%s: %s; its processes are stopped", *key, why)

    def _write_invalid(self, key: Key, obj: dict[str, Any], status: dict[str, Any], message: str) -> None:
        """A job the stand-in cannot run fails validation, as Kubeflow's controller marks it."""
        name = key[1]
        outcome = Outcome(FAILED, f"{self._kind.kind} {name} is not valid: {message}", why=reason("FailedValidation"))
        new_status = self._next_status(status, Observation(name, outcome=outcome))
        if new_status != status:
            LOG.warning("%s %s/%s is not valid: %s", self._kind.kind, *key, message)
            self._write_status(key, obj, new_status)

    # ----- local files ------------------------------------------------------------------------------------------

    def _log_path(self, runtime: JobRuntime, replica: ReplicaRuntime) -> Path:
        return logs.log_path(self.settings.workdir, runtime.namespace, runtime.name, replica.replica.name)

    def _save_state(self, runtime: JobRuntime) -> None:
        state = {
            "namespace": runtime.namespace,
            "job": runtime.name,
            "uid": runtime.uid,
            "masterPort": runtime.master_port,
            "restarts": runtime.restarts,
            "outcome": runtime.outcome.ctype if runtime.outcome else None,
            "replicas": {
                name: {
                    "state": replica.phase.value,
                    "pids": [proc.pid for proc in replica.processes],
                    "attempts": replica.attempts,
                    "exitCode": replica.exit_code,
                    "waitingFor": replica.last_error or None,
                    "metricsPort": replica.metrics_port,
                }
                for name, replica in runtime.replicas.items()
            },
        }
        if self._saved_states.get(runtime.key) != state:
            logs.write_state(logs.state_path(self.settings.workdir, runtime.namespace, runtime.name), state)
            self._saved_states[runtime.key] = state


@contextmanager
def standin_thread(
    api_client: client.ApiClient, settings: StandInSettings, kinds: tuple[str, ...] = ("PyTorchJob", "TrainJob")
) -> Iterator[TrainingOperatorStandIn]:
    """Run a stand-in per kind (PyTorchJobs and TrainJobs) in background threads for the duration of the ``with``
    block (tests, demos); yields the first one."""
    standins = [TrainingOperatorStandIn(api_client, settings, kind) for kind in kinds]
    threads = [
        threading.Thread(target=standin.run, name=f"forge-standin-{kind.lower()}", daemon=True)
        for standin, kind in zip(standins, kinds, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        yield standins[0]
    finally:
        for standin in standins:
            standin.stop()
        for thread in threads:
            thread.join(timeout=settings.stop_grace_cap_s + 30)
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError("the stand-in thread did not stop")
