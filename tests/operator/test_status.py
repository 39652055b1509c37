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


def with_report(status: ForgeJobStatus, **fields: Any) -> ForgeJobStatus:
    """The status after a trainer-style merge patch of top-level fields."""
    return ForgeJobStatus.model_validate({**status.to_api(), **fields})


def by_type(status: ForgeJobStatus) -> dict[str, Condition]:
    return {c.type: c for c in status.conditions}


STOP = {
    "step": 120,
    "reason": "LearningRateTooHigh",
    "rule": "forgetting-slope",
    "message": "forgetting rises 0.8% per 1e-3 of cumulative learning rate",
    "action": "stop",
    "suggestion": {"learningRate": "6e-6", "domainPercent": 50},
}
RUNNING = pytorchjob(("Created", "True"), ("Running", "True"))


def test_early_stop_makes_a_successful_run_early_stopped() -> None:
    """The trainer may exit 0 after an early stop: the PyTorchJob Succeeded, the ForgeJob is EarlyStopped."""
    status = accepted()
    stopped = with_report(status, earlyStop={"step": 120, "reason": "LossDiverged", "message": "loss is NaN"})
    after, change = step(stopped, pytorchjob=pytorchjob(("Succeeded", "True")))
    assert after.state == "EarlyStopped" and is_terminal(after)
    early = by_type(after)["EarlyStopped"]
    assert (early.status, early.reason) == ("True", "LossDiverged")
    assert early.message == "the trainer's guard stopped the run at step 120: loss is NaN"
    assert by_type(after)["Succeeded"].status == "True"
    assert [t.reason for t in change.transitions if t.reason == "EarlyStopped"] == ["EarlyStopped", "EarlyStopped"]


def test_early_stop_exit_code_is_not_a_failure() -> None:
    """Exit code 10 makes the PyTorchJob Failed: recorded as Failed=False, reason EarlyStopped, state EarlyStopped."""
    status = step(accepted(), pytorchjob=RUNNING)[0]
    reported = with_report(status, earlyStop=STOP)
    during, change = step(reported, pytorchjob=RUNNING)
    assert during.state == "Running", "still saving and exiting: not ended yet"
    early = by_type(during)["EarlyStopped"]
    assert (early.status, early.reason) == ("True", "LearningRateTooHigh")
    assert early.message == (
        "the trainer's guard stopped the run at step 120 (rule forgetting-slope): forgetting rises 0.8% per 1e-3 of "
        "cumulative learning rate; suggested for the next run: learningRate 6e-6, domainPercent 50"
    )
    assert any(t.reason == "EarlyStopped" and t.warning for t in change.transitions)

    failed_job = pytorchjob(("Created", "True"), ("Running", "False"), ("Failed", "True"))
    ended, change = step(during, at="2026-01-01T00:10:00Z", pytorchjob=failed_job)
    assert ended.state == "EarlyStopped" and is_terminal(ended)
    failed = by_type(ended)["Failed"]
    assert (failed.status, failed.reason) == ("False", "EarlyStopped")
    assert "stopped the run on purpose (LearningRateTooHigh)" in failed.message and "Failed message" in failed.message
    assert [t.reason for t in change.transitions] == ["EarlyStopped"]  # Running -> EarlyStopped, no Failed event
    assert change.transitions[0].message.startswith("Running -> EarlyStopped: the trainer's guard stopped the run")

    _, change = step(ended, at="2026-01-01T00:20:00Z", pytorchjob=failed_job)
    assert change.empty, "final: later PyTorchJob events change nothing"


def test_an_early_stop_reported_after_the_failure_still_wins() -> None:
    """Whichever arrives first: a Failed PyTorchJob, then the trainer's (delayed) report."""
    status = step(accepted(), pytorchjob=RUNNING)[0]
    failed, _ = step(status, pytorchjob=pytorchjob(("Created", "True"), ("Running", "False"), ("Failed", "True")))
    assert failed.state == "Failed"
    late, change = step(with_report(failed, earlyStop=STOP))
    assert late.state == "EarlyStopped"
    assert by_type(late)["Failed"].status == "False" and by_type(late)["Failed"].reason == "EarlyStopped"
    assert "Failed -> EarlyStopped" in next(t.message for t in change.transitions if t.reason == "EarlyStopped")


def test_a_real_failure_stays_a_failure() -> None:
    status = step(accepted(), pytorchjob=RUNNING)[0]
    warned = with_report(status, earlyStop={**STOP, "action": "warn"})
    failed, _ = step(warned, pytorchjob=pytorchjob(("Created", "True"), ("Failed", "True")))
    assert failed.state == "Failed" and by_type(failed)["Failed"].status == "True"
    assert "EarlyStopped" not in by_type(failed)


def test_a_warning_from_the_guard_is_a_condition_and_an_event_per_report() -> None:
    status = step(accepted(), pytorchjob=RUNNING)[0]
    warn = {"step": 300, "reason": "GradNormSpikes", "message": "3 spikes over 10x the median", "action": "warn"}
    warned, change = step(with_report(status, earlyStop=warn))
    condition = by_type(warned)["GuardWarning"]
    assert (condition.status, condition.reason) == ("True", "GradNormSpikes")
    assert condition.message == "the guard warned at step 300: 3 spikes over 10x the median"
    assert warned.state == "Running" and "EarlyStopped" not in by_type(warned)
    assert [(t.reason, t.warning) for t in change.transitions] == [("GradNormSpikes", True)]
    _, same = step(warned, at="2026-01-01T02:00:00Z")
    assert same.empty, "the same report: no new Event"
    later, change = step(with_report(warned, earlyStop={**warn, "step": 500}))
    assert [t.reason for t in change.transitions] == ["GradNormSpikes"], "a new report: a new Event"
    assert later.state == "Running"


def test_a_rebalance_is_recorded_and_moves_the_suggested_mix() -> None:
    status = step(accepted(), pytorchjob=RUNNING)[0]
    rebalanced, change = step(
        with_report(
            status,
            earlyStop={**STOP, "reason": "ForgettingBudgetExceeded", "action": "rebalance", "suggestion": None},
            rebalance={"step": 400, "domainPercent": 50, "reason": "forgetting 3.1% > budget 2%"},
            latest={"forgettingPercent": 3.1},
        )
    )
    condition = by_type(rebalanced)["Rebalanced"]
    assert condition.status == "True" and condition.reason == "Rebalanced"
    assert condition.message == (
        "from step 400 the general share is 50% (domainPercent 75 -> 50): forgetting 3.1% > budget 2%"
    )
    assert "EarlyStopped" not in by_type(rebalanced) and rebalanced.state == "Running"
    assert ("Rebalanced", False) in [(t.reason, t.warning) for t in change.transitions]
    forgetting = by_type(rebalanced)["ForgettingWithinBudget"]
    # The suggestion starts from the rebalanced mix (50: already half general), not the spec's 75: only the rate
    # (3.6e-5 halved: 2/3.1 is above the 0.5 cap).
    assert forgetting.message.startswith("forgetting 3.1% > budget 2%: lower learningRate to 1.8e-5 (action stop")


def test_forgetting_over_budget_says_what_to_change() -> None:
    status = accepted()
    assert RESOLVED.learning_rate == "3.6e-5" and SPEC.data.domain_percent == 75
    over, change = step(with_report(status, latest={"forgettingPercent": 6.1}))
    condition = by_type(over)["ForgettingWithinBudget"]
    assert (condition.status, condition.reason) == ("False", "ForgettingBudgetExceeded")
    # 3.6e-5 x 2/6.1 = 1.18e-5 -> 1.1e-5 (rounded down); general 25% -> 50%.
    assert condition.message == (
        "forgetting 6.1% > budget 2%: lower learningRate to 1.1e-5 or raise the general share to 50% "
        "(domainPercent 50) (action stop: the trainer's guard stops the run if this persists)"
    )
    assert [(t.reason, t.warning) for t in change.transitions] == [("ForgettingBudgetExceeded", True)]
    within, change = step(with_report(over, latest={"forgettingPercent": 1.25}))
    condition = by_type(within)["ForgettingWithinBudget"]
    assert (condition.status, condition.reason, condition.message) == (
        "True",
        "WithinBudget",
        "forgetting 1.25% is within the budget of 2%",
    )


def test_the_suggested_rate_starts_from_the_learning_rate_probes_choice() -> None:
    probe = {"learningRate": 7.2e-5, "multiplier": 2.0, "reason": "2x is the highest ...", "multiples": []}
    over = step(with_report(accepted(), latest={"forgettingPercent": 6.1}, lrProbe=probe))[0]
    assert over.resolved is not None and over.resolved.learning_rate == "3.6e-5", "resolved keeps the operator's rate"
    # the run trains at 2 x 3.6e-5: 7.2e-5 x 2/6.1 = 2.36e-5 -> 2.3e-5
    message = by_type(over)["ForgettingWithinBudget"].message
    assert message.startswith("forgetting 6.1% > budget 2%: lower learningRate to 2.3e-5 or raise"), message


def test_the_guards_own_suggestion_wins_over_the_rule_of_thumb() -> None:
    status = accepted()
    report = with_report(
        status,
        latest={"forgettingPercent": 6.1},
        earlyStop={**STOP, "action": "warn", "suggestion": {"learningRate": "8e-6"}},
    )
    message = by_type(step(report)[0])["ForgettingWithinBudget"].message
    assert "lower learningRate to 8e-6 or raise the general share to 50% (domainPercent 50)" in message


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


def test_the_pareto_front_is_written_in_api_form() -> None:
    status = accepted()
    report = with_report(
        status,
        checkpoints=[
            {"step": 100, "uri": "s3://acme/o/100/", "forgettingPercent": 0.5, "domainGainPercent": 5.0},
            {"step": 200, "uri": "s3://acme/o/200/", "forgettingPercent": 1.5, "domainGainPercent": 9.0},
        ],
    )
    pareto = SPEC.model_copy(update={"checkpoints": SPEC.checkpoints.model_copy(update={"selection": "pareto"})})
    change = desired_status(report, pareto, generation=1, at="t")
    assert change.patch["status"]["paretoFront"] == [
        {
            "step": 100,
            "uri": "s3://acme/o/100/",
            "kind": "checkpoint",
            "forgettingPercent": 0.5,
            "domainGainPercent": 5.0,
        },
        {
            "step": 200,
            "uri": "s3://acme/o/200/",
            "kind": "checkpoint",
            "forgettingPercent": 1.5,
            "domainGainPercent": 9.0,
        },
    ]
    assert change.patch["status"]["selected"]["kind"] == "checkpoint"
    again = desired_status(apply(report, change), pareto, generation=1, at="later")
    assert again.empty, "written back and read again: nothing changes"


DATA_ERROR = {
    "kind": "DataError",
    "message": "/data/tickets.jsonl:2: 'text' must be a non-empty string",
    "exitCode": 3,
    "retryable": False,
    "rank": 1,
    "time": "2026-01-01T00:09:59Z",
    "raisedAt": "forge_trainer/data/pack.py:197",
}


@pytest.mark.parametrize("report_first", [True, False])
def test_the_failed_condition_quotes_the_trainers_error(report_first: bool) -> None:
    """The cause reaches the status (and kubectl describe), whichever arrives first: the report or the failure."""
    status = step(accepted(), pytorchjob=RUNNING)[0]
    failed_job = pytorchjob(("Created", "True"), ("Running", "False"), ("Failed", "True"))
    if report_first:
        reported = with_report(status, trainerError=DATA_ERROR)
        assert by_type(step(reported, pytorchjob=RUNNING)[0]).get("Failed") is None  # not failed before it fails
        ended, _ = step(reported, pytorchjob=failed_job)
    else:
        failed, _ = step(status, pytorchjob=failed_job)
        assert by_type(failed)["Failed"].reason == "PyTorchJobFailed"
        ended, _ = step(with_report(failed, trainerError=DATA_ERROR))
    assert ended.state == "Failed"
    failed_condition = by_type(ended)["Failed"]
    assert (failed_condition.status, failed_condition.reason) == ("True", "TrainerError")
    assert failed_condition.message == (
        "DataError on rank 1 (exit code 3, not retried; raised at forge_trainer/data/pack.py:197): "
        "/data/tickets.jsonl:2: 'text' must be a non-empty string; the PyTorchJob reported: Failed message"
    )
    _, again = step(ended, at="2026-01-01T00:30:00Z", pytorchjob=failed_job)
    assert again.empty, "idempotent: the message is not prefixed twice"


def test_a_retried_trainer_error_does_not_fail_a_running_job() -> None:
    status = step(accepted(), pytorchjob=RUNNING)[0]
    transient = {**DATA_ERROR, "kind": "StorageUnavailableError", "exitCode": 200, "retryable": True}
    running, _ = step(with_report(status, trainerError=transient), pytorchjob=RUNNING)
    assert running.state == "Running" and "Failed" not in by_type(running)


def queued_pytorchjob(suspend: bool, *conditions: tuple[str, str]) -> dict[str, Any]:
    job = pytorchjob(*conditions)
    job["metadata"] = {"name": "job", "namespace": "ns", "labels": {"kueue.x-k8s.io/queue-name": "team-a"}}
    job["spec"] = {"runPolicy": {"suspend": suspend}}
    return job


def test_kueue_hold_admission_and_preemption_show_as_queued() -> None:
    accepted, _ = step(ForgeJobStatus(), acceptance=ACCEPT)
    held, change = step(accepted, pytorchjob=queued_pytorchjob(True, ("Created", "True"), ("Suspended", "True")))
    queued = next(c for c in held.conditions if c.type == "Queued")
    assert (held.state, queued.status, queued.reason) == ("Queued", "True", "WaitingForAdmission")
    assert "LocalQueue team-a" in queued.message
    assert any(t.reason == "Queued" for t in change.transitions)
    admitted, _ = step(
        held, pytorchjob=queued_pytorchjob(False, ("Created", "True"), ("Suspended", "False"), ("Running", "True"))
    )
    queued = next(c for c in admitted.conditions if c.type == "Queued")
    assert (admitted.state, queued.status, queued.reason) == ("Running", "False", "Admitted")
    preempted, _ = step(
        admitted, pytorchjob=queued_pytorchjob(True, ("Created", "True"), ("Suspended", "True"), ("Running", "False"))
    )
    queued = next(c for c in preempted.conditions if c.type == "Queued")
    assert (preempted.state, queued.status, queued.reason) == ("Queued", "True", "Preempted")


def test_a_suspend_the_user_asked_for_is_not_a_queue_hold() -> None:
    suspended_spec = SPEC.model_copy(update={"suspend": True})
    accepted, _ = step(ForgeJobStatus(), acceptance=ACCEPT)
    change = desired_status(
        accepted,
        suspended_spec,
        generation=2,
        at="2026-01-01T00:00:00Z",
        pytorchjob=queued_pytorchjob(True, ("Created", "True"), ("Suspended", "True")),
    )
    status = apply(accepted, change)
    assert status.state == "Suspended"
    assert all(c.type != "Queued" or c.status == "False" for c in status.conditions)


def test_without_a_queue_label_there_is_no_queued_condition() -> None:
    accepted, _ = step(ForgeJobStatus(), acceptance=ACCEPT)
    job = pytorchjob(("Created", "True"), ("Suspended", "True"))
    job["spec"] = {"runPolicy": {"suspend": True}}
    status, _ = step(accepted, pytorchjob=job)
    assert status.state == "Suspended" and all(c.type != "Queued" for c in status.conditions)


def test_final_conditions_carried_by_a_deleted_pytorchjob_make_the_run_terminal() -> None:
    running, _ = step(
        ForgeJobStatus(), acceptance=ACCEPT, pytorchjob=pytorchjob(("Created", "True"), ("Running", "True"))
    )
    assert not is_terminal(running)
    ended, _ = step(running, pytorchjob=pytorchjob(("Created", "True"), ("Running", "False"), ("Failed", "True")))
    assert ended.state == "Failed" and is_terminal(ended)


PACE_OK = {"ranks": 4, "step": 20, "time": "2026-01-01T00:01:00Z"}
STRAGGLER = {"rank": 2, "pod": "job-worker-1", "node": "gpu-node-7", "stepSeconds": 0.52, "medianSeconds": 0.4,
             "readBacks": 5}  # fmt: skip


def test_a_straggler_degrades_throughput_naming_rank_pod_and_node_and_recovers() -> None:
    status = step(accepted(), pytorchjob=RUNNING)[0]
    assert "ThroughputDegraded" not in by_type(status)  # nothing reported yet: no condition
    normal, change = step(with_report(status, pace=PACE_OK))
    condition = by_type(normal)["ThroughputDegraded"]
    assert (condition.status, condition.reason) == ("False", "Normal") and "130%" in condition.message
    assert not [t for t in change.transitions if t.reason == "Normal"]  # no Event for the normal start
    slow, change = step(with_report(normal, pace={**PACE_OK, "straggler": STRAGGLER}))
    condition = by_type(slow)["ThroughputDegraded"]
    assert (condition.status, condition.reason) == ("True", "Straggler")
    assert condition.message == (
        "rank 2 (pod job-worker-1, node gpu-node-7) takes 0.52 s per step of its own compute, 130% of the other "
        "ranks' median 0.4 s (over 130%), for 5 read-backs in a row: every rank waits for it, the job runs at its pace"
    )
    assert [(t.reason, t.warning) for t in change.transitions] == [("Straggler", True)]
    assert slow.state == "Running"  # reported, nothing else changes
    again, change = step(slow)
    assert change.empty
    recovered, change = step(with_report(again, pace=PACE_OK))
    condition = by_type(recovered)["ThroughputDegraded"]
    assert (condition.status, condition.reason) == ("False", "Recovered")
    assert [(t.reason, t.warning) for t in change.transitions] == [("Recovered", False)]
    assert step(recovered)[1].empty


def test_a_throughput_drop_degrades_throughput_with_its_figures() -> None:
    status = step(accepted(), pytorchjob=RUNNING)[0]
    drop = {"tokensPerSecond": 1200.0, "medianTokensPerSecond": 3000.0, "readBacks": 5}
    dropped, change = step(with_report(status, pace={**PACE_OK, "throughputDrop": drop}))
    condition = by_type(dropped)["ThroughputDegraded"]
    assert (condition.status, condition.reason) == ("True", "ThroughputDrop")
    assert condition.message == (
        "1200 tokens/s, 40% of the job's running median 3000 tokens/s (under 50%), for 5 read-backs in a row"
    )
    assert [(t.reason, t.warning) for t in change.transitions] == [("ThroughputDrop", True)]
    both, _ = step(with_report(dropped, pace={**PACE_OK, "throughputDrop": drop, "straggler": STRAGGLER}))
    condition = by_type(both)["ThroughputDegraded"]
    assert condition.reason == "Straggler" and "throughput dropped too: 1200 tokens/s" in condition.message
