"""The operator's part of a ForgeJob's status, computed purely from what is observed.

Three inputs feed it: the reconcile outcome (Accepted, resolved values, observedGeneration), the child job's
conditions (a PyTorchJob's or a TrainJob's, read through its backend's mapping as a ``ChildReport``), and the
trainer's reports in the status itself
(checkpoints -> selected, latest -> ForgettingWithinBudget, earlyStop -> EarlyStopped or GuardWarning,
rebalance -> Rebalanced). The result is a merge patch holding only the fields that change, plus the transitions
worth an Event.

An early stop is a purpose, not a failure. The trainer reports ``earlyStop`` (action stop) and then ends, with its
early-stop exit code (the PyTorchJob then reports Failed) or with 0 (Succeeded): either way the ForgeJob ends
``EarlyStopped``, and a Failed reported by the PyTorchJob is recorded as ``Failed=False`` with reason
``EarlyStopped``, whichever of the two arrives first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forge_operator import conditions as cond
from forge_operator.advice import advise
from forge_operator.api import (
    TERMINAL_STATES,
    Condition,
    ConditionStatus,
    EarlyStop,
    ForgeJobSpec,
    ForgeJobStatus,
    MonitoringSpec,
    Resolved,
    Selected,
    State,
    StragglerReport,
    ThroughputDropReport,
)
from forge_operator.backends import PYTORCHJOB, ChildReport
from forge_operator.selection import select

ACCEPTED = "Accepted"
FORGETTING = "ForgettingWithinBudget"
EARLY_STOPPED = "EarlyStopped"
GUARD_WARNING = "GuardWarning"
REBALANCED = "Rebalanced"
THROUGHPUT_DEGRADED = "ThroughputDegraded"
REASON_STRAGGLER = "Straggler"
REASON_THROUGHPUT_DROP = "ThroughputDrop"
REASON_RECOVERED = "Recovered"
REASON_NORMAL = "Normal"
QUEUED = "Queued"
# Kueue's label on a job it manages (render.QUEUE_LABEL).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
REASON_WAITING_FOR_ADMISSION = "WaitingForAdmission"
REASON_PREEMPTED = "Preempted"
REASON_ADMITTED = "Admitted"
# The training operator's condition types, mirrored one to one.
MIRRORED_TYPES = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")

WARNING_STATES = frozenset({"Failed", "Restarting"})

REASON_ACCEPTED = "Accepted"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SPEC_CHANGE_REFUSED = "SpecChangeRefused"
REASON_CHILD_CONFLICT = "ChildConflict"
REASON_WITHIN_BUDGET = "WithinBudget"
REASON_BUDGET_EXCEEDED = "ForgettingBudgetExceeded"
REASON_NOT_MEASURED = "NotMeasured"
# Failed=False with this reason: the PyTorchJob failed because the trainer ended the run on purpose.
REASON_EARLY_STOPPED = "EarlyStopped"


@dataclass(frozen=True)
class Acceptance:
    """What the reconcile handler decided about one generation of the spec."""

    generation: int
    accepted: bool
    reason: str
    message: str
    resolved: Resolved | None = None
    pytorch_job: str | None = None
    train_job: str | None = None
    """The child job's name in status.pytorchJob or status.trainJob, by backend."""
    unknown: bool = False
    """Accepted=Unknown: the cluster refused what the decision needs (a missing CRD, RBAC, an outage)."""

    @property
    def condition_status(self) -> ConditionStatus:
        if self.unknown:
            return "Unknown"
        return "True" if self.accepted else "False"


@dataclass(frozen=True)
class Transition:
    """A change worth a Kubernetes Event on the ForgeJob."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class StatusChange:
    """A merge patch for ``/status`` (empty when nothing changes) and the transitions it makes."""

    patch: dict[str, Any]
    transitions: list[Transition] = field(default_factory=list)
    state: State = "Pending"

    @property
    def empty(self) -> bool:
        return not self.patch


def _stopped_on_purpose(conditions: Sequence[Condition]) -> bool:
    """The PyTorchJob failed, and the failure is the trainer's early stop (recorded as Failed=False)."""
    failed = cond.find(conditions, "Failed")
    return failed is not None and failed.status == "False" and failed.reason == REASON_EARLY_STOPPED


def _terminal(conditions: Sequence[Condition]) -> bool:
    """The PyTorchJob ended: Succeeded or Failed True, or its Failed turned into an early stop."""
    return (
        cond.is_true(conditions, "Succeeded") or cond.is_true(conditions, "Failed") or _stopped_on_purpose(conditions)
    )


def mirror_pytorchjob(
    conditions: Sequence[Condition], pytorchjob: Mapping[str, Any], *, at: str, generation: int | None
) -> list[Condition]:
    """The training operator's conditions copied onto the ForgeJob (``mirror_child`` of a PyTorchJob)."""
    return mirror_child(conditions, PYTORCHJOB.report(pytorchjob), at=at, generation=generation)


def mirror_child(
    conditions: Sequence[Condition], child: ChildReport, *, at: str, generation: int | None
) -> list[Condition]:
    """The child job's conditions (in the ForgeJob's vocabulary, by its backend) copied onto the ForgeJob.

    A type the child no longer reports (the training operator drops Running when it sets Restarting and the
    other way round) turns False. Once Succeeded or Failed is True the ForgeJob's conditions are final.
    """
    if _terminal(conditions):
        return list(conditions)
    source = child.conditions
    result = list(conditions)
    for condition_type in MIRRORED_TYPES:
        reported = source.get(condition_type)
        if reported is not None:
            status: ConditionStatus = reported.get("status", "Unknown")
            if status not in ("True", "False", "Unknown"):
                status = "Unknown"
            result = cond.upsert(
                result,
                condition_type,
                status,
                reported.get("reason") or f"{child.kind}{condition_type}",
                reported.get("message") or "",
                at=reported.get("lastTransitionTime") or at,
                observed_generation=generation,
            )
        elif cond.is_true(result, condition_type):
            result = cond.upsert(
                result,
                condition_type,
                "False",
                "NotReported",
                f"the {child.kind} no longer reports {condition_type}",
                at=at,
                observed_generation=generation,
            )
    return result


def queued_condition(
    conditions: Sequence[Condition],
    pytorchjob: Mapping[str, Any],
    suspend_requested: bool,
    *,
    at: str,
    generation: int | None,
) -> list[Condition]:
    """``queued_child`` of a PyTorchJob."""
    return queued_child(conditions, PYTORCHJOB.report(pytorchjob), suspend_requested, at=at, generation=generation)


def queued_child(
    conditions: Sequence[Condition],
    child: ChildReport,
    suspend_requested: bool,
    *,
    at: str,
    generation: int | None,
) -> list[Condition]:
    """Queued=True while Kueue holds the run: the child job carries a queue label and is suspended, and the user did
    not ask for it. Reason WaitingForAdmission before the run ever ran, Preempted after (Kueue suspended it again);
    Queued=False, reason Admitted, once Kueue un-suspends it."""
    if _terminal(conditions):
        return list(conditions)
    queue = child.queue
    if not queue:
        return list(conditions)
    suspended = child.suspended
    name, namespace, kind = child.name, child.namespace, child.kind
    if suspended and not suspend_requested:
        if cond.find(conditions, "Running") is not None:
            reason = REASON_PREEMPTED
            why = (
                "Kueue suspended it again (pre-empted or evicted); it resumes from its last checkpoint when re-admitted"
            )
        else:
            reason = REASON_WAITING_FOR_ADMISSION
            why = "waiting for Kueue to admit it (quota in the ClusterQueue behind the LocalQueue)"
        message = (
            f"{kind} {name} is held in LocalQueue {queue}: {why}; see `kubectl get workloads -n {namespace}` "
            f"(no Workload: is Kueue installed, with the {kind} integration?)"
        )
        return cond.upsert(conditions, QUEUED, "True", reason, message, at=at, observed_generation=generation)
    if cond.find(conditions, QUEUED) is None:
        return list(conditions)
    if suspended:  # the user's spec.suspend: the Suspended state says it
        reason, message = "SuspendedBySpec", f"suspended by spec.suspend; Kueue queue {queue}"
    else:
        reason, message = REASON_ADMITTED, f"admitted by Kueue from LocalQueue {queue}"
    return cond.upsert(conditions, QUEUED, "False", reason, message, at=at, observed_generation=generation)


def _percent(value: float) -> str:
    """6.1 -> '6.1', 6.125 -> '6.13', 7.0 -> '7': figures for people."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


ACTION_CONSEQUENCE = {
    "stop": "action stop: the trainer's guard stops the run if this persists",
    "warn": "action warn: the run goes on",
    "rebalance": "action rebalance: the trainer's guard raises the general share if this persists",
}


def over_budget_message(
    forgetting: float,
    budget: float,
    learning_rate: str | None,
    domain_percent: int,
    action: str,
    early_stop: EarlyStop | None = None,
) -> str:
    """'forgetting 6.1% > budget 2%: lower learningRate to 1.1e-5 or raise the general share to 50% (domainPercent
    50) (<what the guard does>)'."""
    advice = advise(forgetting, budget, learning_rate, domain_percent, early_stop.suggestion if early_stop else None)
    message = f"forgetting {_percent(forgetting)}% > budget {_percent(budget)}%"
    sentence = advice.sentence()
    if sentence:
        message += f": {sentence}"
    consequence = ACTION_CONSEQUENCE.get(action)
    return f"{message} ({consequence})" if consequence else message


def forgetting_condition(
    conditions: Sequence[Condition],
    spec: ForgeJobSpec,
    status: ForgeJobStatus,
    budget: int,
    *,
    at: str,
    generation: int | None,
) -> list[Condition]:
    """ForgettingWithinBudget from the trainer's latest forgettingPercent against the accepted budget."""
    latest = status.latest.forgetting_percent if status.latest else None
    if latest is None:
        if cond.find(conditions, FORGETTING) is not None:
            return list(conditions)
        return cond.upsert(
            conditions,
            FORGETTING,
            "Unknown",
            REASON_NOT_MEASURED,
            "no evaluation reported yet",
            at=at,
            observed_generation=generation,
        )
    if latest <= budget:
        return cond.upsert(
            conditions,
            FORGETTING,
            "True",
            REASON_WITHIN_BUDGET,
            f"forgetting {_percent(latest)}% is within the budget of {_percent(budget)}%",
            at=at,
            observed_generation=generation,
        )
    learning_rate = status.resolved.learning_rate if status.resolved else None
    if status.lr_probe is not None:
        learning_rate = f"{status.lr_probe.learning_rate:g}"  # the learning-rate probe's choice: what it trains at
    domain_percent = status.rebalance.domain_percent if status.rebalance else spec.data.domain_percent
    message = over_budget_message(
        latest, budget, learning_rate, domain_percent, spec.forgetting.action, status.early_stop
    )
    return cond.upsert(
        conditions, FORGETTING, "False", REASON_BUDGET_EXCEEDED, message, at=at, observed_generation=generation
    )


def guard_message(stop: EarlyStop, verb: str) -> str:
    """'stopped at step 120 (rule forgetting-budget): <the trainer's message>; suggested: learningRate 6e-6, ...'."""
    where = f" at step {stop.step}" if stop.step is not None else ""
    rule = f" (rule {stop.rule})" if stop.rule else ""
    message = f"{verb}{where}{rule}"
    if stop.message:
        message += f": {stop.message}"
    suggestion = stop.suggestion
    if suggestion is not None and (suggestion.learning_rate is not None or suggestion.domain_percent is not None):
        parts = []
        if suggestion.learning_rate is not None:
            parts.append(f"learningRate {suggestion.learning_rate}")
        if suggestion.domain_percent is not None:
            parts.append(f"domainPercent {suggestion.domain_percent}")
        message += f"; suggested for the next run: {', '.join(parts)}"
    return message


def early_stop_condition(
    conditions: Sequence[Condition],
    status: ForgeJobStatus,
    *,
    at: str,
    generation: int | None,
    kind: str = "PyTorchJob",
) -> list[Condition]:
    """EarlyStopped=True once the guard reports a stop; GuardWarning=True for a rule that only warned.

    A Failed=True that the PyTorchJob reports for an early-stopped run becomes Failed=False, reason EarlyStopped:
    the trainer ended on purpose (its early-stop exit code), which is no failure.
    """
    stop = status.early_stop
    if stop is None:
        return list(conditions)
    if stop.action == "warn":
        message = guard_message(stop, "the guard warned")
        return cond.upsert(
            conditions, GUARD_WARNING, "True", stop.reason, message, at=at, observed_generation=generation
        )
    if stop.action == "rebalance":
        return list(conditions)  # recorded by the Rebalanced condition from status.rebalance
    result = cond.upsert(
        conditions,
        EARLY_STOPPED,
        "True",
        stop.reason,
        guard_message(stop, "the trainer's guard stopped the run"),
        at=at,
        observed_generation=generation,
    )
    failed = cond.find(result, "Failed")
    if failed is not None and failed.status == "True":
        result = cond.upsert(
            result,
            "Failed",
            "False",
            REASON_EARLY_STOPPED,
            f"the trainer stopped the run on purpose ({stop.reason}); the {kind} reported: {failed.message}",
            at=at,
            observed_generation=generation,
        )
    return result


REASON_TRAINER_ERROR = "TrainerError"


def trainer_error_message(status: ForgeJobStatus) -> str | None:
    """'DataError on rank 1 (exit code 3, not retried): /data/t.jsonl:2: ...': the trainer's own account."""
    err = status.trainer_error
    if err is None:
        return None
    retry = "retried" if err.retryable else "not retried"
    where = f"; raised at {err.raised_at}" if err.raised_at else ""
    return f"{err.kind} on rank {err.rank} (exit code {err.exit_code}, {retry}{where}): {err.message}"


def failure_condition(
    conditions: Sequence[Condition],
    status: ForgeJobStatus,
    *,
    at: str,
    generation: int | None,
    kind: str = "PyTorchJob",
) -> list[Condition]:
    """A Failed=True condition carries the trainer's reported error, so the cause is in the status, not only in a
    pod log: reason TrainerError and the trainer's message before what the PyTorchJob said."""
    failed = cond.find(conditions, "Failed")
    account = trainer_error_message(status)
    if failed is None or failed.status != "True" or account is None or failed.message.startswith(account):
        return list(conditions)
    reported = f"; the {kind} reported: {failed.message}" if failed.message else ""
    return cond.upsert(
        conditions,
        "Failed",
        "True",
        REASON_TRAINER_ERROR,
        f"{account}{reported}",
        at=at,
        observed_generation=generation,
    )


def rebalance_condition(
    conditions: Sequence[Condition], spec: ForgeJobSpec, status: ForgeJobStatus, *, at: str, generation: int | None
) -> list[Condition]:
    """Rebalanced=True with the new mix once the trainer reports status.rebalance."""
    rebalance = status.rebalance
    if rebalance is None:
        return list(conditions)
    before = rebalance.previous_domain_percent or spec.data.domain_percent
    message = (
        f"from step {rebalance.step} the general share is {100 - rebalance.domain_percent}% "
        f"(domainPercent {before} -> {rebalance.domain_percent})"
    )
    if rebalance.reason:
        message += f": {rebalance.reason}"
    return cond.upsert(conditions, REBALANCED, "True", "Rebalanced", message, at=at, observed_generation=generation)


def straggler_message(report: StragglerReport, monitoring: MonitoringSpec) -> str:
    """'rank 1 (pod p, node n) takes 0.51 s per step of its own compute, 4100% of the other ranks' median 0.0124 s
    (over 130%), for 5 read-backs in a row: every rank waits for it'."""
    where = ", ".join(
        part
        for part in (f"pod {report.pod}" if report.pod else "", f"node {report.node}" if report.node else "")
        if part
    )
    message = f"rank {report.rank}" + (f" ({where})" if where else "")
    if report.step_seconds is not None and report.median_seconds:
        percent = 100 * report.step_seconds / report.median_seconds
        message += (
            f" takes {report.step_seconds:.3g} s per step of its own compute, {percent:.0f}% of the other ranks' "
            f"median {report.median_seconds:.3g} s (over {monitoring.straggler_percent}%)"
        )
    else:
        message += " is slower than the other ranks"
    if report.read_backs:
        message += f", for {report.read_backs} read-backs in a row"
    return message + ": every rank waits for it, the job runs at its pace"


def drop_message(report: ThroughputDropReport, monitoring: MonitoringSpec) -> str:
    """'1.2e+03 tokens/s, 40% of the job's running median 3e+03 tokens/s (under 50%), for 5 read-backs in a row'."""
    now, median = report.tokens_per_second, report.median_tokens_per_second
    if now is None or not median:
        message = f"tokens/s under {monitoring.throughput_drop_percent}% of the job's running median"
    else:
        message = (
            f"{now:.4g} tokens/s, {100 * now / median:.0f}% of the job's running median {median:.4g} tokens/s "
            f"(under {monitoring.throughput_drop_percent}%)"
        )
    if report.read_backs:
        message += f", for {report.read_backs} read-backs in a row"
    return message


def throughput_condition(
    conditions: Sequence[Condition], spec: ForgeJobSpec, status: ForgeJobStatus, *, at: str, generation: int | None
) -> list[Condition]:
    """ThroughputDegraded from the trainer's status.pace: True with reason Straggler (first) or ThroughputDrop;
    False with reason Recovered once neither holds after one did, Normal before. Absent until the trainer reports."""
    pace = status.pace
    if pace is None:
        return list(conditions)
    monitoring = spec.monitoring
    if pace.straggler is not None:
        message = straggler_message(pace.straggler, monitoring)
        if pace.throughput_drop is not None:
            message += f"; throughput dropped too: {drop_message(pace.throughput_drop, monitoring)}"
        return cond.upsert(
            conditions, THROUGHPUT_DEGRADED, "True", REASON_STRAGGLER, message, at=at, observed_generation=generation
        )
    if pace.throughput_drop is not None:
        message = drop_message(pace.throughput_drop, monitoring)
        return cond.upsert(
            conditions,
            THROUGHPUT_DEGRADED,
            "True",
            REASON_THROUGHPUT_DROP,
            message,
            at=at,
            observed_generation=generation,
        )
    old = cond.find(conditions, THROUGHPUT_DEGRADED)
    recovered = old is not None and (old.status == "True" or old.reason == REASON_RECOVERED)
    reason = REASON_RECOVERED if recovered else REASON_NORMAL
    message = (
        f"every rank within {monitoring.straggler_percent}% of the others' median step time and tokens/s above "
        f"{monitoring.throughput_drop_percent}% of the running median"
        + (f" (checked over {pace.ranks} ranks)" if pace.ranks else "")
    )
    return cond.upsert(conditions, THROUGHPUT_DEGRADED, "False", reason, message, at=at, observed_generation=generation)


def derive_state(conditions: Sequence[Condition], started: bool) -> State:
    """The summary state. Terminal conditions are read by type and status, never by their position."""
    accepted = cond.find(conditions, ACCEPTED)
    if not started and accepted is not None and accepted.status == "False" and accepted.reason == REASON_INVALID_SPEC:
        return "Invalid"
    if cond.is_true(conditions, EARLY_STOPPED) and _terminal(conditions):
        return "EarlyStopped"
    if cond.is_true(conditions, "Failed"):
        return "Failed"
    if cond.is_true(conditions, "Succeeded"):
        return "Succeeded"
    if cond.is_true(conditions, QUEUED):
        return "Queued"
    if cond.is_true(conditions, "Suspended"):
        return "Suspended"
    if cond.is_true(conditions, "Restarting"):
        return "Restarting"
    if cond.is_true(conditions, "Running"):
        return "Running"
    return "Pending"


def _state_message(state: State, conditions: Sequence[Condition]) -> str:
    source = {
        "Failed": "Failed",
        "Succeeded": "Succeeded",
        "EarlyStopped": EARLY_STOPPED,
        "Queued": QUEUED,
        "Suspended": "Suspended",
        "Restarting": "Restarting",
        "Running": "Running",
        "Invalid": ACCEPTED,
    }.get(state)
    found = cond.find(conditions, source) if source else None
    return found.message if found is not None and found.message else ""


def _dump_conditions(conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    return [c.to_api() for c in conditions]


def _transitions(
    before: ForgeJobStatus,
    after_conditions: Sequence[Condition],
    state: State,
    selected_changed: bool,
    after: Selected | None,
) -> list[Transition]:
    events: list[Transition] = []
    old_accepted = cond.find(before.conditions, ACCEPTED)
    new_accepted = cond.find(after_conditions, ACCEPTED)
    if new_accepted is not None and (
        old_accepted is None
        or (old_accepted.status, old_accepted.reason, old_accepted.message)
        != (new_accepted.status, new_accepted.reason, new_accepted.message)
    ):
        events.append(Transition(new_accepted.reason, new_accepted.message, warning=new_accepted.status != "True"))
    if before.state != state and state != "Invalid":  # the InvalidSpec event already says it
        message = f"{before.state or 'New'} -> {state}"
        detail = _state_message(state, after_conditions)
        events.append(Transition(state, f"{message}: {detail}" if detail else message, warning=state in WARNING_STATES))
    old_forgetting = cond.find(before.conditions, FORGETTING)
    new_forgetting = cond.find(after_conditions, FORGETTING)
    if (
        new_forgetting is not None
        and new_forgetting.status == "False"
        and (old_forgetting is None or old_forgetting.status != "False")
    ):
        events.append(Transition(new_forgetting.reason, new_forgetting.message, warning=True))
    old_stop = cond.find(before.conditions, EARLY_STOPPED)
    new_stop = cond.find(after_conditions, EARLY_STOPPED)
    if new_stop is not None and new_stop.status == "True" and (old_stop is None or old_stop.status != "True"):
        events.append(Transition(EARLY_STOPPED, f"{new_stop.reason}: {new_stop.message}", warning=True))
    for condition_type in (GUARD_WARNING, REBALANCED):
        old = cond.find(before.conditions, condition_type)
        new = cond.find(after_conditions, condition_type)
        # Each new report is an Event: a later warning or rebalance changes the reason or the message.
        if new is not None and (
            old is None or (old.status, old.reason, old.message) != (new.status, new.reason, new.message)
        ):
            events.append(Transition(new.reason, new.message, warning=condition_type == GUARD_WARNING))
    old_pace = cond.find(before.conditions, THROUGHPUT_DEGRADED)
    new_pace = cond.find(after_conditions, THROUGHPUT_DEGRADED)
    was_degraded = old_pace is not None and old_pace.status == "True"
    if new_pace is not None and (
        (new_pace.status == "True" and (not was_degraded or old_pace is None or old_pace.message != new_pace.message))
        or (new_pace.status != "True" and was_degraded)
    ):  # degraded (the trainer reports only a new rank or a new drop), or recovered: each an Event
        events.append(Transition(new_pace.reason, new_pace.message, warning=new_pace.status == "True"))
    if selected_changed and after is not None:
        events.append(Transition("CheckpointSelected", f"{after.uri}: {after.reason}"))
    return events


def desired_status(
    status: ForgeJobStatus,
    spec: ForgeJobSpec | None,
    *,
    generation: int | None,
    at: str,
    acceptance: Acceptance | None = None,
    pytorchjob: Mapping[str, Any] | None = None,
    child: ChildReport | None = None,
) -> StatusChange:
    """The operator-owned status fields for the observed inputs, as a minimal merge patch.

    ``acceptance`` is given by the reconcile handler, ``child`` (or a ``pytorchjob`` object) by the child job's
    watcher; the trainer's fields in ``status`` are read, never written.
    """
    if child is None and pytorchjob is not None:
        child = PYTORCHJOB.report(pytorchjob)
    conditions: list[Condition] = list(status.conditions)
    if acceptance is None and child is None and cond.find(conditions, ACCEPTED) is None:
        return StatusChange({}, [], status.state or "Pending")  # not reconciled yet: nothing to derive
    patch: dict[str, Any] = {}
    pytorch_job_name = status.pytorch_job or status.train_job
    if acceptance is not None:
        conditions = cond.upsert(
            conditions,
            ACCEPTED,
            acceptance.condition_status,
            acceptance.reason,
            acceptance.message,
            at=at,
            observed_generation=acceptance.generation,
        )
        if status.observed_generation != acceptance.generation:
            patch["observedGeneration"] = acceptance.generation
        if acceptance.resolved is not None and acceptance.resolved != status.resolved:
            patch["resolved"] = acceptance.resolved.to_api()
        if acceptance.pytorch_job is not None and acceptance.pytorch_job != status.pytorch_job:
            patch["pytorchJob"] = acceptance.pytorch_job
            pytorch_job_name = acceptance.pytorch_job
        if acceptance.train_job is not None and acceptance.train_job != status.train_job:
            patch["trainJob"] = acceptance.train_job
            pytorch_job_name = acceptance.train_job
    kind = "TrainJob" if status.train_job or (acceptance is not None and acceptance.train_job) else "PyTorchJob"
    if child is not None:
        kind = child.kind
        conditions = mirror_child(conditions, child, at=at, generation=generation)
        suspend_requested = spec.suspend if spec is not None else False
        conditions = queued_child(conditions, child, suspend_requested, at=at, generation=generation)
    selected_changed = False
    new_selected = status.selected
    resolved = acceptance.resolved if acceptance is not None and acceptance.resolved else status.resolved
    if spec is not None and pytorch_job_name is not None:
        # The budget the run was accepted with (a refused change must not move it); the policy may change.
        accepted_budget = resolved.forgetting_budget_percent if resolved else None
        budget = accepted_budget if accepted_budget is not None else spec.forgetting.budget_percent
        conditions = forgetting_condition(conditions, spec, status, budget, at=at, generation=generation)
        conditions = early_stop_condition(conditions, status, at=at, generation=generation, kind=kind)
        conditions = rebalance_condition(conditions, spec, status, at=at, generation=generation)
        conditions = failure_condition(conditions, status, at=at, generation=generation, kind=kind)
        conditions = throughput_condition(conditions, spec, status, at=at, generation=generation)
        selection = select(
            status.checkpoints,
            status.baseline,
            spec.checkpoints.selection,
            budget,
            spec.checkpoints.budget_confidence_percent,
        )
        new_selected = selection.selected
        if new_selected != status.selected:
            selected_changed = new_selected is not None and (
                status.selected is None or status.selected.uri != new_selected.uri
            )
            patch["selected"] = new_selected.to_api() if new_selected is not None else None
        if selection.pareto_front != status.pareto_front:
            patch["paretoFront"] = [point.to_api() for point in selection.pareto_front]
    state = derive_state(conditions, started=pytorch_job_name is not None)
    if state != status.state:
        patch["state"] = state
    if conditions != status.conditions:
        patch["conditions"] = _dump_conditions(conditions)
    transitions = _transitions(status, conditions, state, selected_changed, new_selected)
    return StatusChange({"status": patch} if patch else {}, transitions, state)


def is_terminal(status: ForgeJobStatus) -> bool:
    """Whether the run finished (Succeeded/EarlyStopped/Failed): its child job is never re-created."""
    return status.state in TERMINAL_STATES or _terminal(status.conditions)
