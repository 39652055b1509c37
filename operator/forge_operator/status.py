"""The operator's part of a ForgeJob's status, computed purely from what is observed.

Three inputs feed it: the reconcile outcome (Accepted, resolved values, observedGeneration), the PyTorchJob's
conditions (mirrored as the training operator writes them), and the trainer's reports in the status itself
(checkpoints -> selected, latest -> ForgettingWithinBudget, earlyStop -> EarlyStopped). The result is a merge patch
holding only the fields that change, plus the transitions worth an Event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forge_operator import conditions as cond
from forge_operator.api import (
    TERMINAL_STATES,
    Condition,
    ConditionStatus,
    ForgeJobSpec,
    ForgeJobStatus,
    Resolved,
    Selected,
    State,
)
from forge_operator.selection import select

ACCEPTED = "Accepted"
FORGETTING = "ForgettingWithinBudget"
EARLY_STOPPED = "EarlyStopped"
# The training operator's condition types, mirrored one to one.
MIRRORED_TYPES = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")

WARNING_STATES = frozenset({"Failed", "Restarting"})

REASON_ACCEPTED = "Accepted"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SPEC_CHANGE_REFUSED = "SpecChangeRefused"
REASON_CHILD_CONFLICT = "ChildConflict"


@dataclass(frozen=True)
class Acceptance:
    """What the reconcile handler decided about one generation of the spec."""

    generation: int
    accepted: bool
    reason: str
    message: str
    resolved: Resolved | None = None
    pytorch_job: str | None = None


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


def _pytorchjob_conditions(pytorchjob: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    status = pytorchjob.get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or [] if isinstance(c, dict) and "type" in c}


def _terminal(conditions: Sequence[Condition]) -> bool:
    return cond.is_true(conditions, "Succeeded") or cond.is_true(conditions, "Failed")


def mirror_pytorchjob(
    conditions: Sequence[Condition], pytorchjob: Mapping[str, Any], *, at: str, generation: int | None
) -> list[Condition]:
    """The training operator's conditions copied onto the ForgeJob.

    A type the PyTorchJob no longer lists (the training operator drops Running when it sets Restarting and the
    other way round) turns False. Once Succeeded or Failed is True the ForgeJob's conditions are final.
    """
    if _terminal(conditions):
        return list(conditions)
    source = _pytorchjob_conditions(pytorchjob)
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
                reported.get("reason") or f"PyTorchJob{condition_type}",
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
                f"the PyTorchJob no longer reports {condition_type}",
                at=at,
                observed_generation=generation,
            )
    return result


def forgetting_condition(
    conditions: Sequence[Condition],
    spec: ForgeJobSpec,
    status: ForgeJobStatus,
    budget: int,
    *,
    at: str,
    generation: int | None,
) -> list[Condition]:
    latest = status.latest.forgetting_percent if status.latest else None
    if latest is None:
        if cond.find(conditions, FORGETTING) is not None:
            return list(conditions)
        return cond.upsert(
            conditions,
            FORGETTING,
            "Unknown",
            "NotMeasured",
            "no evaluation reported yet",
            at=at,
            observed_generation=generation,
        )
    if latest <= budget:
        return cond.upsert(
            conditions,
            FORGETTING,
            "True",
            "WithinBudget",
            f"forgetting {latest:.2f}% is within the budget of {budget}%",
            at=at,
            observed_generation=generation,
        )
    return cond.upsert(
        conditions,
        FORGETTING,
        "False",
        "ForgettingBudgetExceeded",
        f"forgetting {latest:.2f}% exceeds the budget of {budget}% (action: {spec.forgetting.action})",
        at=at,
        observed_generation=generation,
    )


def early_stop_condition(
    conditions: Sequence[Condition], status: ForgeJobStatus, *, at: str, generation: int | None
) -> list[Condition]:
    stop = status.early_stop
    if stop is None:
        return list(conditions)
    where = f" at step {stop.step}" if stop.step is not None else ""
    message = stop.message or f"the trainer stopped the run early{where}"
    return cond.upsert(conditions, EARLY_STOPPED, "True", stop.reason, message, at=at, observed_generation=generation)


def derive_state(conditions: Sequence[Condition], started: bool) -> State:
    """The summary state. Terminal conditions are read by type and status, never by their position."""
    accepted = cond.find(conditions, ACCEPTED)
    if not started and accepted is not None and accepted.status == "False" and accepted.reason == REASON_INVALID_SPEC:
        return "Invalid"
    if cond.is_true(conditions, "Failed"):
        return "Failed"
    if cond.is_true(conditions, "Succeeded"):
        return "EarlyStopped" if cond.is_true(conditions, EARLY_STOPPED) else "Succeeded"
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
    if selected_changed and after is not None:
        events.append(Transition("CheckpointSelected", f"step {after.step} ({after.uri}): {after.reason}"))
    return events


def desired_status(
    status: ForgeJobStatus,
    spec: ForgeJobSpec | None,
    *,
    generation: int | None,
    at: str,
    acceptance: Acceptance | None = None,
    pytorchjob: Mapping[str, Any] | None = None,
) -> StatusChange:
    """The operator-owned status fields for the observed inputs, as a minimal merge patch.

    ``acceptance`` is given by the reconcile handler, ``pytorchjob`` by the PyTorchJob watcher; the trainer's
    fields in ``status`` are read, never written.
    """
    conditions: list[Condition] = list(status.conditions)
    if acceptance is None and pytorchjob is None and cond.find(conditions, ACCEPTED) is None:
        return StatusChange({}, [], status.state or "Pending")  # not reconciled yet: nothing to derive
    patch: dict[str, Any] = {}
    pytorch_job_name = status.pytorch_job
    if acceptance is not None:
        conditions = cond.upsert(
            conditions,
            ACCEPTED,
            "True" if acceptance.accepted else "False",
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
    if pytorchjob is not None:
        conditions = mirror_pytorchjob(conditions, pytorchjob, at=at, generation=generation)
    selected_changed = False
    new_selected = status.selected
    resolved = acceptance.resolved if acceptance is not None and acceptance.resolved else status.resolved
    if spec is not None and pytorch_job_name is not None:
        # The budget the run was accepted with (a refused change must not move it); the policy may change.
        accepted_budget = resolved.forgetting_budget_percent if resolved else None
        budget = accepted_budget if accepted_budget is not None else spec.forgetting.budget_percent
        conditions = forgetting_condition(conditions, spec, status, budget, at=at, generation=generation)
        conditions = early_stop_condition(conditions, status, at=at, generation=generation)
        selection = select(status.checkpoints, status.baseline, spec.checkpoints.selection, budget)
        new_selected = selection.selected
        if new_selected != status.selected:
            selected_changed = new_selected is not None and (
                status.selected is None
                or (status.selected.step, status.selected.uri) != (new_selected.step, new_selected.uri)
            )
            patch["selected"] = new_selected.to_api() if new_selected is not None else None
        if selection.pareto_front != status.pareto_front:
            patch["paretoFront"] = selection.pareto_front
    state = derive_state(conditions, started=pytorch_job_name is not None)
    if state != status.state:
        patch["state"] = state
    if conditions != status.conditions:
        patch["conditions"] = _dump_conditions(conditions)
    transitions = _transitions(status, conditions, state, selected_changed, new_selected)
    return StatusChange({"status": patch} if patch else {}, transitions, state)


def is_terminal(status: ForgeJobStatus) -> bool:
    """Whether the run finished (Succeeded/EarlyStopped/Failed): its PyTorchJob is never re-created."""
    return status.state in TERMINAL_STATES or _terminal(status.conditions)
