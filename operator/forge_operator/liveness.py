"""Stall detection: from the trainer's progress reports, whether a run still moves, and what to do when it does not.

Pure: the inputs are the ForgeJob's status and spec.monitoring, the operator's limits and the time now; the output is
a ``Verdict`` and the status change it makes. The handler (``handlers/handle_liveness.py``) only reads, writes and
deletes.

A run is judged only while it is Running (never while queued, suspended, restarting or finished: Kueue and the
training operator own those). The clock starts at the latest of: the trainer's last progress report
(``status.progress.time``: a new step, or a new phase), the Running condition's transition (a start, a resume
after a suspension, a restart by the training operator) and the operator's own last stall restart. While the
trainer trains the limit is ``spec.monitoring.stallMinutes``, or derived from the run's own pace:
``max(floor, 3 x progress.reportIntervalSeconds)``; in any other phase (setup, compile, evaluate, candidates, or no
report yet) it is ``spec.monitoring.startupMinutes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from forge_operator import conditions as cond
from forge_operator.api import Condition, ForgeJobStatus, MonitoringSpec, PodRef, StallRestart
from forge_operator.status import StatusChange, Transition, derive_state, is_terminal

PROGRESSING = "Progressing"
REASON_STALLED = "Stalled"
REASON_ADVANCING = "StepsAdvancing"
# How many expected report gaps may pass without a new step before a training run counts as stalled.
REPORT_GAPS = 3
DEFAULT_STALL_FLOOR_SECONDS = 600

Action = Literal["none", "restart", "finish-restart", "fail", "warn"]


@dataclass(frozen=True)
class Limits:
    """The operator's side of the limits (settings), separate from the spec."""

    stall_floor_seconds: float = DEFAULT_STALL_FLOOR_SECONDS
    """The derived training limit never goes below this (FORGE_STALL_FLOOR_SECONDS)."""


@dataclass(frozen=True)
class Verdict:
    """Whether the run is stalled, for how long, against which limit, and what the operator does about it."""

    judged: bool
    """False while the run is not Running (queued, suspended, restarting, pending, finished)."""
    stalled: bool = False
    phase: str = ""
    idle_seconds: float = 0.0
    limit_seconds: float = 0.0
    since: str | None = None
    action: Action = "none"
    why: str = ""


def parse_time(text: str | None) -> datetime | None:
    """RFC 3339 (as the API server or the trainer writes it) -> an aware datetime; None when absent or unreadable."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def training_limit_seconds(status: ForgeJobStatus, monitoring: MonitoringSpec, limits: Limits) -> tuple[float, str]:
    """The training phase's limit and how it was obtained (for the condition's message)."""
    if monitoring.stall_minutes is not None:
        return monitoring.stall_minutes * 60.0, f"spec.monitoring.stallMinutes {monitoring.stall_minutes}"
    gap = status.progress.report_interval_seconds if status.progress else None
    if not gap:
        return limits.stall_floor_seconds, f"the floor {limits.stall_floor_seconds:g} s (no step time reported yet)"
    derived = REPORT_GAPS * gap
    if derived <= limits.stall_floor_seconds:
        return limits.stall_floor_seconds, (
            f"the floor {limits.stall_floor_seconds:g} s ({REPORT_GAPS} x the report gap {gap:g} s is less)"
        )
    return derived, f"{REPORT_GAPS} x the expected report gap of {gap:g} s"


def clock_start(status: ForgeJobStatus) -> datetime | None:
    """The latest moment the run showed life or was (re)started."""
    running = cond.find(status.conditions, "Running")
    candidates = [
        parse_time(status.progress.time if status.progress else None),
        parse_time(running.last_transition_time if running is not None else None),
        parse_time(status.last_stall_restart.time if status.last_stall_restart else None),
    ]
    known = [moment for moment in candidates if moment is not None]
    return max(known) if known else None


def restarted_since_report(status: ForgeJobStatus) -> bool:
    """The operator restarted the run after the trainer's last progress report."""
    record = status.last_stall_restart
    if record is None:
        return False
    restarted = parse_time(record.time)
    reported = parse_time(status.progress.time if status.progress else None)
    return restarted is not None and (reported is None or reported <= restarted)


def restart_pending(status: ForgeJobStatus) -> bool:
    """A recorded stall restart whose pods may still need deleting: no progress was reported since it."""
    record = status.last_stall_restart
    return record is not None and bool(record.pods) and not is_terminal(status) and restarted_since_report(status)


def judge(status: ForgeJobStatus, monitoring: MonitoringSpec, limits: Limits, now: datetime) -> Verdict:
    """Whether the run is stalled now, and the action spec.monitoring.onStall asks for."""
    if is_terminal(status) or status.state != "Running":
        return Verdict(judged=False, why=f"state {status.state or 'Pending'}: not judged")
    start = clock_start(status)
    if start is None:
        return Verdict(judged=False, why="no start time known yet")
    progress = status.progress
    phase = (progress.phase if progress else None) or "setup"
    if restarted_since_report(status):
        phase = "setup"  # the re-created pods start up (and may wait to be scheduled) before they report again
    if phase == "train":
        limit, why = training_limit_seconds(status, monitoring, limits)
    else:
        limit, why = monitoring.startup_minutes * 60.0, f"spec.monitoring.startupMinutes {monitoring.startup_minutes}"
    idle = max(0.0, (now - start).total_seconds())
    since = cond.timestamp(start)
    if idle <= limit:
        action: Action = "finish-restart" if restart_pending(status) else "none"
        return Verdict(True, False, phase, idle, limit, since, action, why)
    restarts = status.stall_restarts or 0
    if monitoring.on_stall == "warn":
        action = "warn"
    elif monitoring.on_stall == "restart" and restarts < monitoring.max_stall_restarts:
        action = "restart"
    else:
        action = "fail"
    return Verdict(True, True, phase, idle, limit, since, action, why)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def stall_message(verdict: Verdict, status: ForgeJobStatus, monitoring: MonitoringSpec, logs_hint: str) -> str:
    """'no new step for 12.0 min in phase train (limit 10.0 min: ...); last step 140 at ...; <what happens>; read
    the last lines of the trainer logs: kubectl logs ...'."""
    progress = status.progress
    step = progress.step if progress and progress.step is not None else None
    last = f"last step {step}" if step is not None else "no step reported yet"
    when = progress.time if progress and progress.time else verdict.since
    message = (
        f"no progress for {_minutes(verdict.idle_seconds)} in phase {verdict.phase} "
        f"(limit {_minutes(verdict.limit_seconds)}: {verdict.why}); {last}, reported at {when}"
    )
    restarts = status.stall_restarts or 0
    if verdict.action == "restart":
        message += (
            f"; restarting the pods (stall restart {restarts + 1} of {monitoring.max_stall_restarts}): the run "
            "resumes from its latest complete checkpoint"
        )
    elif verdict.action == "fail":
        if monitoring.on_stall == "restart":
            message += f"; the {monitoring.max_stall_restarts} stall restart(s) allowed are used: the run fails"
        else:
            message += "; spec.monitoring.onStall is fail: the run fails"
    elif verdict.action == "warn":
        message += "; spec.monitoring.onStall is warn: nothing is restarted"
    if status.trainer_error is not None:
        message += f"; the trainer's last error: {status.trainer_error.kind}: {status.trainer_error.message[:300]}"
    return f"{message}; the last log lines say why: {logs_hint}"


def recovered(status: ForgeJobStatus, stalled: Condition) -> bool:
    """After a stall, the run counts as progressing again at its first training step reported after the stall."""
    reported = parse_time(status.progress.time if status.progress else None)
    since = parse_time(stalled.last_transition_time)
    phase = status.progress.phase if status.progress else None
    return phase == "train" and reported is not None and (since is None or reported > since)


@dataclass(frozen=True)
class LivenessChange:
    """The status change of one check, and what the handler must do after writing it."""

    change: StatusChange
    verdict: Verdict
    delete_pods: list[PodRef]
    """Pods to delete (a restart, or the rest of an interrupted one)."""
    stop_child: bool
    """Delete the child job (onStall fail)."""


def liveness_change(
    status: ForgeJobStatus,
    monitoring: MonitoringSpec,
    limits: Limits,
    now: datetime,
    *,
    pods: Sequence[PodRef],
    logs_hint: str,
    generation: int | None,
) -> LivenessChange:
    """Judge the run and build the status patch: Progressing, the restart record (written before any pod is
    deleted), Failed on onStall fail. ``pods`` are the child job's pods now (the ones a restart deletes)."""
    verdict = judge(status, monitoring, limits, now)
    at = cond.timestamp(now)
    conditions: list[Condition] = list(status.conditions)
    patch: dict[str, object] = {}
    transitions: list[Transition] = []
    delete: list[PodRef] = []
    stop_child = False
    if not verdict.judged:
        return LivenessChange(StatusChange({}, [], status.state or "Pending"), verdict, [], False)
    old = cond.find(status.conditions, PROGRESSING)
    if verdict.stalled and verdict.action == "warn" and old is not None and old.reason == REASON_STALLED:
        pass  # already said (the message is not refreshed every check: one write per stall)
    elif verdict.stalled:
        message = stall_message(verdict, status, monitoring, logs_hint)
        conditions = cond.upsert(
            conditions, PROGRESSING, "False", REASON_STALLED, message, at=at, observed_generation=generation
        )
        if verdict.action == "restart":
            record = StallRestart(time=at, step=status.progress.step if status.progress else None, pods=list(pods))
            patch["stallRestarts"] = (status.stall_restarts or 0) + 1
            patch["lastStallRestart"] = record.to_api()
            delete = list(pods)
        elif verdict.action == "fail":
            conditions = cond.upsert(
                conditions, "Failed", "True", REASON_STALLED, message, at=at, observed_generation=generation
            )
            stop_child = True
        transitions.append(Transition(REASON_STALLED, message, warning=True))
    else:
        if verdict.action == "finish-restart" and status.last_stall_restart is not None:
            wanted = {pod.uid for pod in status.last_stall_restart.pods}
            delete = [pod for pod in pods if pod.uid in wanted]
        first = old is None and verdict.phase == "train"
        if first or (old is not None and old.status != "True" and recovered(status, old)):
            message = f"the trainer reports progress (phase {verdict.phase}, limit {_minutes(verdict.limit_seconds)})"
            conditions = cond.upsert(
                conditions, PROGRESSING, "True", REASON_ADVANCING, message, at=at, observed_generation=generation
            )
            if old is not None:
                transitions.append(Transition("Recovered", f"the run progresses again: {message}"))
    if conditions != status.conditions:
        patch["conditions"] = [c.to_api() for c in conditions]
    state = derive_state(conditions, started=status.pytorch_job is not None or status.train_job is not None)
    if state != status.state:
        patch["state"] = state
        transitions.append(Transition(state, f"{status.state} -> {state}", warning=state == "Failed"))
    return LivenessChange(
        StatusChange({"status": patch} if patch else {}, transitions, state), verdict, delete, stop_child
    )


def logs_hint(namespace: str, selector: str, lead_pod: str) -> str:
    """Where a person reads the trainer's last log lines."""
    return (
        f"`kubectl logs -n {namespace} {lead_pod} --tail=50` (rank 0), or every rank: "
        f"`kubectl logs -n {namespace} -l {selector} --prefix --tail=20`"
    )
