"""The operator's Prometheus metrics (served on FORGE_METRICS_PORT at /metrics).

No label is named ``job``: Prometheus renames it ``exported_job`` on scrape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from forge_operator.api import STATES, ForgeJobStatus, State
from forge_operator.selection import complete_checkpoints

REGISTRY = CollectorRegistry(auto_describe=True)

FORGEJOBS = Gauge(
    "forge_forgejobs",
    "ForgeJobs seen by this operator, by state.",
    ["state"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "forge_reconcile_duration_seconds",
    "Duration of one handler run, by handler.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "forge_api_requests",
    "Requests of the operator's own code to the API server, by RBAC verb, API group and resource (kopf's watches "
    "not included).",
    ["verb", "group", "resource"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "forge_reconcile_errors_total",
    "Handler errors and refusals by kind: invalid_spec, spec_change_refused, child_conflict, conflict, api, internal.",
    ["kind"],
    registry=REGISTRY,
)
CHILDREN_CREATED = Counter(
    "forge_children_created_total",
    "Child objects created, by kind (ConfigMap, ServiceAccount, Role, RoleBinding, PyTorchJob).",
    ["kind"],
    registry=REGISTRY,
)
# Per-ForgeJob series for the dashboard. Labels: namespace and forge_job (never "job").
SELECTED_STEP = Gauge(
    "forge_forgejob_selected_step",
    "Step of the checkpoint the selection policy chose (status.selected.step); absent while none is selected.",
    ["namespace", "forge_job"],
    registry=REGISTRY,
)
CHECKPOINTS = Gauge(
    "forge_forgejob_checkpoints",
    "Complete checkpoints reported in the ForgeJob's status.checkpoints (end-of-run candidates not counted).",
    ["namespace", "forge_job"],
    registry=REGISTRY,
)
STALLED = Gauge(
    "forge_forgejob_stalled",
    "1 while the ForgeJob's Progressing condition is False with reason Stalled (no step reported within the stall "
    "limit), else 0.",
    ["namespace", "forge_job"],
    registry=REGISTRY,
)
STALL_RESTARTS = Gauge(
    "forge_forgejob_stall_restarts",
    "Restarts the operator made because the run stalled (status.stallRestarts).",
    ["namespace", "forge_job"],
    registry=REGISTRY,
)
STATUS_PATCHES = Counter(
    "forge_status_patches_total",
    "Status patches written to ForgeJobs, by handler.",
    ["handler"],
    registry=REGISTRY,
)

_states: dict[tuple[str, str], State] = {}
_lock = threading.Lock()


def _publish() -> None:
    counts = dict.fromkeys(STATES, 0)
    for state in _states.values():
        counts[state] += 1
    for state, count in counts.items():
        FORGEJOBS.labels(state=state).set(count)


def record_state(namespace: str, name: str, state: State) -> None:
    with _lock:
        _states[(namespace, name)] = state
        _publish()


def _remove(gauge: Gauge, namespace: str, name: str) -> None:
    with suppress(KeyError):  # never set
        gauge.remove(namespace, name)


def record_status(namespace: str, name: str, status: ForgeJobStatus) -> None:
    """Everything the operator exports about one ForgeJob, from its status."""
    if status.state is not None:
        record_state(namespace, name, status.state)
    with _lock:
        if status.selected is not None:
            SELECTED_STEP.labels(namespace=namespace, forge_job=name).set(status.selected.step)
        else:
            _remove(SELECTED_STEP, namespace, name)
        omitted = status.checkpoints_omitted.count if status.checkpoints_omitted else 0
        CHECKPOINTS.labels(namespace=namespace, forge_job=name).set(complete_checkpoints(status.checkpoints) + omitted)
        progressing = next((c for c in status.conditions if c.type == "Progressing"), None)
        stalled = progressing is not None and progressing.status == "False" and progressing.reason == "Stalled"
        STALLED.labels(namespace=namespace, forge_job=name).set(1 if stalled else 0)
        STALL_RESTARTS.labels(namespace=namespace, forge_job=name).set(status.stall_restarts or 0)


def forget(namespace: str, name: str) -> None:
    with _lock:
        _states.pop((namespace, name), None)
        _publish()
        _remove(SELECTED_STEP, namespace, name)
        _remove(CHECKPOINTS, namespace, name)
        _remove(STALLED, namespace, name)
        _remove(STALL_RESTARTS, namespace, name)


@contextmanager
def timed(handler: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        RECONCILE_SECONDS.labels(handler=handler).observe(time.perf_counter() - started)


def error_kind(error: BaseException) -> str:
    """A short, bounded label value for an exception."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return "conflict" if status == 409 else "api"
    if type(error).__name__ == "StatusConflictError":
        return "conflict"
    return "internal"


def serve(port: int) -> None:
    """Start the /metrics HTTP server in a daemon thread (port 0: disabled)."""
    if port:
        start_http_server(port, registry=REGISTRY)
    with _lock:
        _publish()
