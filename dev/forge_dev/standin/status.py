"""PyTorchJob status, written the way Kubeflow's training-operator writes it. Pure functions.

The condition rules are Kubeflow's ``UpdateJobConditions``: nothing changes once Failed is True; a condition whose
status and reason are unchanged is left alone (times included); lastTransitionTime moves only when the status
changes; setting Running removes Restarting and vice versa; setting Succeeded or Failed turns Running to False.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from forge_dev.standin.spec import KIND, replica_selector

CREATED = "Created"
RUNNING = "Running"
RESTARTING = "Restarting"
SUCCEEDED = "Succeeded"
SUSPENDED = "Suspended"
FAILED = "Failed"

Condition = dict[str, str]


def utc_now() -> str:
    """RFC 3339, UTC, whole seconds: how metav1.Time serialises."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reason(what: str) -> str:
    """Kubeflow's ``NewReason(kind, reason)``: ``PyTorchJobRunning``, ``PyTorchJobFailed``, ..."""
    return f"{KIND}{what}"


def is_true(conditions: list[Condition], ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True" for c in conditions)


def is_finished(conditions: list[Condition]) -> bool:
    return is_true(conditions, SUCCEEDED) or is_true(conditions, FAILED)


def _filter_out(conditions: list[Condition], ctype: str) -> list[Condition]:
    kept: list[Condition] = []
    for condition in conditions:
        other = condition.get("type")
        if other == ctype or {ctype, other} == {RUNNING, RESTARTING}:
            continue
        if ctype in (FAILED, SUCCEEDED) and other == RUNNING:
            condition = {**condition, "status": "False"}
        kept.append(condition)
    return kept


def update_conditions(
    conditions: list[Condition], ctype: str, status: str, why: str, message: str, now: str
) -> list[Condition]:
    """A new condition list with ``ctype`` set (Kubeflow's setCondition)."""
    if is_true(conditions, FAILED):
        return conditions
    current = next((c for c in conditions if c.get("type") == ctype), None)
    if current is not None and current.get("status") == status and current.get("reason") == why:
        return conditions
    transition = now
    if current is not None and current.get("status") == status:
        transition = current.get("lastTransitionTime", now)
    new: Condition = {
        "type": ctype,
        "status": status,
        "reason": why,
        "message": message,
        "lastUpdateTime": now,
        "lastTransitionTime": transition,
    }
    return [*_filter_out(conditions, ctype), new]


@dataclass(frozen=True)
class ReplicaCounts:
    active: int = 0
    succeeded: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Outcome:
    """A job's end: ``Succeeded`` or ``Failed`` with Kubeflow's message."""

    ctype: str
    message: str
    why: str = ""

    @property
    def reason(self) -> str:
        return self.why or reason(self.ctype)


@dataclass(frozen=True)
class Observation:
    """What the stand-in knows about a job's processes at one moment."""

    job_name: str
    replicas: dict[str, ReplicaCounts] = field(default_factory=dict)
    running: bool = False
    restarting_message: str | None = None
    outcome: Outcome | None = None
    suspended: bool = False


def _replica_statuses(job_name: str, replicas: dict[str, ReplicaCounts], suspended: bool) -> dict[str, Any]:
    return {
        rtype: {
            "active": 0 if suspended else counts.active,
            "succeeded": counts.succeeded,
            "failed": counts.failed,
            "selector": replica_selector(job_name, rtype),
        }
        for rtype, counts in replicas.items()
    }


def next_status(current: dict[str, Any], observation: Observation, now: str) -> dict[str, Any]:
    """The status to write, from the stored one and an observation. Equal to ``current`` when nothing changed.

    ``lastReconcileTime`` is refreshed only together with another change, so an idle job costs no writes.
    """
    status = copy.deepcopy(current)
    name = observation.job_name
    conditions: list[Condition] = list(status.get("conditions") or [])
    if not any(c.get("type") == CREATED for c in conditions):
        conditions = update_conditions(conditions, CREATED, "True", reason(CREATED), f"{KIND} {name} is created.", now)
    status["replicaStatuses"] = {
        **(status.get("replicaStatuses") or {}),
        **_replica_statuses(name, observation.replicas, observation.suspended),
    }
    if observation.suspended:
        message = f"{KIND} {name} is suspended."
        if is_true(conditions, RUNNING):
            conditions = update_conditions(conditions, RUNNING, "False", reason(SUSPENDED), message, now)
        if not is_true(conditions, SUSPENDED):
            conditions = update_conditions(conditions, SUSPENDED, "True", reason(SUSPENDED), message, now)
    else:
        if is_true(conditions, SUSPENDED):
            message = f"{KIND} {name} is resumed."
            conditions = update_conditions(conditions, SUSPENDED, "False", reason("Resumed"), message, now)
            status["startTime"] = now
        status.setdefault("startTime", now)
        conditions = _progress_conditions(conditions, observation, now)
        if observation.outcome is not None:
            status.setdefault("completionTime", now)
            outcome = observation.outcome
            conditions = update_conditions(conditions, outcome.ctype, "True", outcome.reason, outcome.message, now)
    status["conditions"] = conditions
    if _without_reconcile_time(status) != _without_reconcile_time(current):
        status["lastReconcileTime"] = now
    return status


def _progress_conditions(conditions: list[Condition], observation: Observation, now: str) -> list[Condition]:
    if observation.restarting_message is not None:
        return update_conditions(
            conditions, RESTARTING, "True", reason(RESTARTING), observation.restarting_message, now
        )
    if observation.running:
        message = f"{KIND} {observation.job_name} is running."
        return update_conditions(conditions, RUNNING, "True", reason(RUNNING), message, now)
    return conditions


def _without_reconcile_time(status: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in status.items() if key != "lastReconcileTime"}


def failed_replicas_message(job_name: str, failed: int, rtype: str) -> str:
    return f"{KIND} {job_name} is failed because {failed} {rtype} replica(s) failed."


def restarting_message(job_name: str, failed: int, rtype: str) -> str:
    return f"{KIND} {job_name} is restarting because {failed} {rtype} replica(s) failed."


def succeeded_message(job_name: str) -> str:
    return f"{KIND} {job_name} is successfully completed."


def backoff_message(job_name: str) -> str:
    return f"{KIND} {job_name} has failed because it has reached the specified backoff limit"


def deadline_message(job_name: str) -> str:
    return f"{KIND} {job_name} has failed because it was active longer than specified deadline"
