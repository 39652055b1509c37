"""The operator's status computation (pure): acceptance, mirroring, state, selection, transitions, idempotence."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from forge_operator.api import Condition, ForgeJobSpec, ForgeJobStatus
from forge_operator.defaults import resolve
from forge_operator.status import Acceptance, StatusChange, derive_state, desired_status, is_terminal

SPEC = ForgeJobSpec.model_validate(
    {
        "model": {"base": "s3://models/llama-3.2-1b/"},
        "technique": "sft",
        "data": {"domain": [{"uri": "s3://acme/d/"}], "general": [{"uri": "s3://acme/g/"}]},
        "checkpoints": {"output": "s3://acme/o/"},
    }
)
RESOLVED = resolve(SPEC)
ACCEPT = Acceptance(1, True, "Accepted", "PyTorchJob job: ...", resolved=RESOLVED, pytorch_job="job")


def apply(status: ForgeJobStatus, change: StatusChange) -> ForgeJobStatus:
    """The status after the API server applies the merge patch (top-level keys replace, None deletes)."""
    merged = status.to_api()
    for key, value in change.patch.get("status", {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return ForgeJobStatus.model_validate(merged)


def step(
    status: ForgeJobStatus, at: str = "2026-01-01T00:00:00Z", **kwargs: Any
) -> tuple[ForgeJobStatus, StatusChange]:
    change = desired_status(status, SPEC, generation=1, at=at, **kwargs)
    return apply(status, change), change


def pytorchjob(*conditions: tuple[str, str]) -> dict[str, Any]:
    return {
        "status": {
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": f"PyTorchJob{t}",
                    "message": f"{t} message",
                    "lastTransitionTime": "2026-01-01T00:00:05Z",
                }
                for t, s in conditions
            ]
        }
    }


def accepted() -> ForgeJobStatus:
    return step(ForgeJobStatus(), acceptance=ACCEPT)[0]


def test_acceptance_sets_condition_generation_resolved_and_pytorchjob() -> None:
    status, change = step(ForgeJobStatus(), acceptance=ACCEPT)
    patch = change.patch["status"]
    assert patch["observedGeneration"] == 1 and patch["pytorchJob"] == "job" and patch["state"] == "Pending"
    assert patch["resolved"]["learningRate"] == RESOLVED.learning_rate
    condition = next(c for c in status.conditions if c.type == "Accepted")
    assert (condition.status, condition.reason, condition.observed_generation) == ("True", "Accepted", 1)
    assert [t.reason for t in change.transitions] == ["Accepted", "Pending"]


def test_the_same_inputs_give_an_empty_patch() -> None:
    status = accepted()
    _, again = step(status, at="2026-01-01T01:00:00Z", acceptance=ACCEPT)
    assert again.empty and again.transitions == []
    _, event_only = step(status, at="2026-01-01T01:00:00Z")
    assert event_only.empty


def test_nothing_is_derived_before_the_first_reconcile() -> None:
    change = desired_status(ForgeJobStatus(), SPEC, generation=1, at="t")
    assert change.empty


def test_invalid_spec_state_and_warning() -> None:
    refused = Acceptance(1, False, "InvalidSpec", "spec.data.general: required")
    status, change = step(ForgeJobStatus(), acceptance=refused)
    assert status.state == "Invalid"
    assert all(t.warning for t in change.transitions)
    assert not any(c.type == "ForgettingWithinBudget" for c in status.conditions), "no forgetting without a run"


def test_refused_spec_change_keeps_the_run_state() -> None:
    status = step(accepted(), pytorchjob=pytorchjob(("Created", "True"), ("Running", "True")))[0]
    refused = Acceptance(2, False, "SpecChangeRefused", "spec.training.learningRate changed")
    after, change = step(status, acceptance=refused)
    assert after.state == "Running" and after.observed_generation == 2
    assert after.resolved == status.resolved
    assert [t.reason for t in change.transitions] == ["SpecChangeRefused"]


TRAINING_OPERATOR_SEQUENCE = [
    ([("Created", "True")], "Pending"),
    ([("Created", "True"), ("Running", "True")], "Running"),
    ([("Created", "True"), ("Restarting", "True")], "Restarting"),
    ([("Created", "True"), ("Running", "True")], "Running"),
    ([("Created", "True"), ("Running", "False"), ("Succeeded", "True")], "Succeeded"),
]


def test_mirroring_follows_the_training_operator() -> None:
    status = accepted()
    for conditions, state in TRAINING_OPERATOR_SEQUENCE:
        status, _ = step(status, pytorchjob=pytorchjob(*conditions))
        assert status.state == state, conditions
    by_type = {c.type: c for c in status.conditions}
    assert by_type["Succeeded"].status == "True" and by_type["Succeeded"].reason == "PyTorchJobSucceeded"
    assert by_type["Running"].status == "False"
    assert by_type["Restarting"].status == "False" and by_type["Restarting"].reason == "NotReported"
    assert by_type["Succeeded"].last_transition_time == "2026-01-01T00:00:05Z", "taken from the PyTorchJob"


def test_terminal_conditions_are_final() -> None:
    status = accepted()
    status = step(status, pytorchjob=pytorchjob(("Failed", "True")))[0]
    assert status.state == "Failed" and is_terminal(status)
    after, change = step(status, pytorchjob=pytorchjob(("Running", "True")))
    assert after.state == "Failed" and change.empty


@pytest.mark.parametrize("order", list(itertools.permutations(["Succeeded", "Running", "Created"])))
def test_state_does_not_depend_on_the_order_of_conditions(order: tuple[str, ...]) -> None:
    statuses = {"Succeeded": "True", "Running": "False", "Created": "True"}
    conditions = [Condition(type=t, status=statuses[t], reason="r", last_transition_time="t") for t in order]  # type: ignore[arg-type]
    assert derive_state(conditions, started=True) == "Succeeded"


def test_last_condition_true_but_not_terminal_is_not_success() -> None:
    conditions = [
        Condition(type="Succeeded", status="False", reason="r", last_transition_time="t"),
        Condition(type="Running", status="True", reason="r", last_transition_time="t"),
    ]
    assert derive_state(conditions, started=True) == "Running"


def test_failed_wins_over_succeeded_and_suspended_over_running() -> None:
    def conditions(**statuses: str) -> list[Condition]:
        return [Condition(type=t, status=s, reason="r", last_transition_time="t") for t, s in statuses.items()]  # type: ignore[arg-type]

    assert derive_state(conditions(Succeeded="True", Failed="True"), started=True) == "Failed"
    assert derive_state(conditions(Running="True", Suspended="True"), started=True) == "Suspended"
    assert derive_state(conditions(Suspended="False", Running="True"), started=True) == "Running"


def test_trainer_reports_drive_selection_and_forgetting() -> None:
    status = accepted()
    report = ForgeJobStatus.model_validate(
        {
            **status.to_api(),
            "latest": {"forgettingPercent": 1.2, "domainGainPercent": 9.0},
            "checkpoints": [
                {"step": 100, "uri": "s3://acme/o/step-100/", "forgettingPercent": 1.2, "domainGainPercent": 9.0}
            ],
        }
    )
    after, change = step(report)
    assert after.selected is not None and after.selected.step == 100
    forgetting = next(c for c in after.conditions if c.type == "ForgettingWithinBudget")
    assert forgetting.status == "True" and forgetting.reason == "WithinBudget"
    assert "CheckpointSelected" in [t.reason for t in change.transitions]
    over = ForgeJobStatus.model_validate({**after.to_api(), "latest": {"forgettingPercent": 4.0}})
    later, change = step(over)
    forgetting = next(c for c in later.conditions if c.type == "ForgettingWithinBudget")
    assert forgetting.status == "False" and forgetting.reason == "ForgettingBudgetExceeded"
    assert any(t.warning and t.reason == "ForgettingBudgetExceeded" for t in change.transitions)
    assert "CheckpointSelected" not in [t.reason for t in change.transitions], "same checkpoint: no new event"


def test_forgetting_is_unknown_until_measured() -> None:
    status = accepted()
    forgetting = next(c for c in status.conditions if c.type == "ForgettingWithinBudget")
    assert forgetting.status == "Unknown" and forgetting.reason == "NotMeasured"


def test_early_stop_makes_a_successful_run_early_stopped() -> None:
    status = accepted()
    stopped = ForgeJobStatus.model_validate(
        {**status.to_api(), "earlyStop": {"step": 120, "reason": "LossDiverged", "message": "loss is NaN"}}
    )
    after = step(stopped, pytorchjob=pytorchjob(("Succeeded", "True")))[0]
    assert after.state == "EarlyStopped"
    early = next(c for c in after.conditions if c.type == "EarlyStopped")
    assert (early.status, early.reason, early.message) == ("True", "LossDiverged", "loss is NaN")


def test_selection_uses_the_accepted_budget_not_a_refused_new_one() -> None:
    status = accepted()
    assert status.resolved is not None and status.resolved.forgetting_budget_percent == 2
    report = ForgeJobStatus.model_validate(
        {
            **status.to_api(),
            "checkpoints": [
                {"step": 100, "uri": "s3://acme/o/100/", "forgettingPercent": 1.0, "domainGainPercent": 5.0},
                {"step": 200, "uri": "s3://acme/o/200/", "forgettingPercent": 9.0, "domainGainPercent": 30.0},
            ],
        }
    )
    loose = SPEC.model_copy(update={"forgetting": SPEC.forgetting.model_copy(update={"budget_percent": 50})})
    change = desired_status(report, loose, generation=2, at="t")
    assert change.patch["status"]["selected"]["step"] == 100
