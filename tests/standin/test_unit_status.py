"""Pure helpers: PyTorchJob conditions and status, Kubeflow's rules."""

from __future__ import annotations

from typing import Any

import pytest

from forge_dev.standin.status import (
    Condition,
    Observation,
    Outcome,
    ReplicaCounts,
    is_finished,
    next_status,
    update_conditions,
)

pytestmark = pytest.mark.timeout(30)

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"


def _types(conditions: list[Condition]) -> list[tuple[str, str]]:
    return [(c["type"], c["status"]) for c in conditions]


def test_same_status_and_reason_is_a_no_op() -> None:
    first = update_conditions([], "Running", "True", "PyTorchJobRunning", "m", T0)
    assert update_conditions(first, "Running", "True", "PyTorchJobRunning", "other message", T1) is first


def test_transition_time_moves_only_when_the_status_changes() -> None:
    running = update_conditions([], "Running", "True", "PyTorchJobRunning", "m", T0)
    same_status = update_conditions(running, "Running", "True", "OtherReason", "m", T1)
    assert same_status[-1]["lastTransitionTime"] == T0 and same_status[-1]["lastUpdateTime"] == T1
    flipped = update_conditions(same_status, "Running", "False", "PyTorchJobSuspended", "m", T2)
    assert flipped[-1]["lastTransitionTime"] == T2


def test_running_and_restarting_replace_each_other() -> None:
    conditions = update_conditions([], "Created", "True", "PyTorchJobCreated", "m", T0)
    conditions = update_conditions(conditions, "Running", "True", "PyTorchJobRunning", "m", T0)
    conditions = update_conditions(conditions, "Restarting", "True", "PyTorchJobRestarting", "m", T1)
    assert _types(conditions) == [("Created", "True"), ("Restarting", "True")]
    conditions = update_conditions(conditions, "Running", "True", "PyTorchJobRunning", "m", T2)
    assert _types(conditions) == [("Created", "True"), ("Running", "True")]


def test_succeeded_turns_running_false_and_failed_freezes_everything() -> None:
    conditions = update_conditions([], "Running", "True", "PyTorchJobRunning", "m", T0)
    succeeded = update_conditions(conditions, "Succeeded", "True", "PyTorchJobSucceeded", "m", T1)
    assert _types(succeeded) == [("Running", "False"), ("Succeeded", "True")]
    assert is_finished(succeeded)
    failed = update_conditions(conditions, "Failed", "True", "PyTorchJobFailed", "m", T1)
    assert _types(failed) == [("Running", "False"), ("Failed", "True")]
    assert update_conditions(failed, "Running", "True", "PyTorchJobRunning", "m", T2) is failed


def _status_after(*steps: Observation) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for number, observation in enumerate(steps):
        status = next_status(status, observation, f"2026-01-01T00:00:{number:02d}Z")
    return status


def test_lifecycle_created_running_succeeded_with_times_and_replica_statuses() -> None:
    counts = {"Master": ReplicaCounts(active=1), "Worker": ReplicaCounts(active=2)}
    done = {"Master": ReplicaCounts(succeeded=1), "Worker": ReplicaCounts(succeeded=2)}
    status = _status_after(
        Observation("j", counts, running=True),
        Observation("j", done, outcome=Outcome("Succeeded", "PyTorchJob j is successfully completed.")),
    )
    assert _types(status["conditions"]) == [("Created", "True"), ("Running", "False"), ("Succeeded", "True")]
    assert status["conditions"][-1]["reason"] == "PyTorchJobSucceeded"
    assert status["startTime"] == "2026-01-01T00:00:00Z"
    assert status["completionTime"] == "2026-01-01T00:00:01Z"
    assert status["replicaStatuses"]["Worker"]["succeeded"] == 2
    assert status["replicaStatuses"]["Master"]["selector"].endswith("training.kubeflow.org/replica-type=master")


def test_an_unchanged_observation_writes_nothing() -> None:
    observation = Observation("j", {"Master": ReplicaCounts(active=1)}, running=True)
    status = _status_after(observation)
    assert next_status(status, observation, "2026-01-01T01:00:00Z") == status


def test_restarting_then_failed_by_backoff() -> None:
    counts = {"Master": ReplicaCounts(active=1)}
    status = _status_after(
        Observation("j", counts, running=True),
        Observation("j", {"Master": ReplicaCounts()}, restarting_message="PyTorchJob j is restarting because ..."),
        Observation("j", {"Master": ReplicaCounts(failed=1)}, outcome=Outcome("Failed", "backoff")),
    )
    assert _types(status["conditions"]) == [("Created", "True"), ("Restarting", "True"), ("Failed", "True")]
    assert status["conditions"][-1]["reason"] == "PyTorchJobFailed"
    assert status["replicaStatuses"]["Master"] == {
        "active": 0,
        "succeeded": 0,
        "failed": 1,
        "selector": status["replicaStatuses"]["Master"]["selector"],
    }


def test_suspend_and_resume() -> None:
    running = Observation("j", {"Master": ReplicaCounts(active=1)}, running=True)
    suspended = Observation("j", {"Master": ReplicaCounts()}, suspended=True)
    status = _status_after(running, suspended)
    assert _types(status["conditions"]) == [("Created", "True"), ("Running", "False"), ("Suspended", "True")]
    assert {c["reason"] for c in status["conditions"][1:]} == {"PyTorchJobSuspended"}
    assert status["replicaStatuses"]["Master"]["active"] == 0

    resumed = next_status(status, running, T2)
    assert _types(resumed["conditions"]) == [("Created", "True"), ("Suspended", "False"), ("Running", "True")]
    assert resumed["conditions"][1]["reason"] == "PyTorchJobResumed"
    assert resumed["startTime"] == T2


def test_a_job_created_suspended_has_no_start_time() -> None:
    status = _status_after(Observation("j", {"Master": ReplicaCounts()}, suspended=True))
    assert "startTime" not in status
    assert _types(status["conditions"]) == [("Created", "True"), ("Suspended", "True")]
