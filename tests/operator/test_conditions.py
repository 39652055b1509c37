"""Condition upserts: lastTransitionTime moves only when the status flips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from forge_operator import conditions as cond
from forge_operator.api import CONDITION_MESSAGE_MAX


def test_new_condition_is_appended_with_the_time() -> None:
    result = cond.upsert([], "Running", "True", "PyTorchJobRunning", "running", at="2026-01-01T00:00:00Z")
    assert [c.type for c in result] == ["Running"]
    assert result[0].last_transition_time == "2026-01-01T00:00:00Z"


def test_same_status_keeps_the_transition_time_but_refreshes_the_rest() -> None:
    first = cond.upsert([], "Accepted", "False", "InvalidSpec", "a", at="2026-01-01T00:00:00Z", observed_generation=1)
    second = cond.upsert(
        first, "Accepted", "False", "SpecChangeRefused", "b", at="2026-01-02T00:00:00Z", observed_generation=2
    )
    (condition,) = second
    assert condition.last_transition_time == "2026-01-01T00:00:00Z"
    assert (condition.reason, condition.message, condition.observed_generation) == ("SpecChangeRefused", "b", 2)


def test_a_flip_moves_the_transition_time() -> None:
    first = cond.upsert([], "Suspended", "True", "S", "", at="2026-01-01T00:00:00Z")
    second = cond.upsert(first, "Suspended", "False", "R", "", at="2026-01-02T00:00:00Z")
    assert second[0].last_transition_time == "2026-01-02T00:00:00Z"


def test_position_is_kept_and_lookups_are_by_type() -> None:
    conditions = cond.upsert([], "A", "True", "r", "", at="t0")
    conditions = cond.upsert(conditions, "B", "False", "r", "", at="t0")
    conditions = cond.upsert(conditions, "A", "False", "r", "", at="t1")
    assert [c.type for c in conditions] == ["A", "B"]
    assert not cond.is_true(conditions, "A") and not cond.is_true(conditions, "B") and not cond.is_true(conditions, "C")
    assert cond.find(conditions, "B") is not None
    assert [c.type for c in cond.remove(conditions, "A")] == ["B"]


def test_timestamps_are_utc_seconds() -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=timezone(timedelta(hours=2)))
    assert cond.timestamp(moment) == "2026-03-04T03:06:07Z"
    assert cond.now().endswith("Z") and datetime.strptime(cond.now(), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_a_message_longer_than_a_condition_holds_is_cut_and_says_so() -> None:
    long = "x" * (CONDITION_MESSAGE_MAX + 10)
    (cut,) = cond.upsert([], "Failed", "True", "TrainerError", long, at="2026-12-05T00:00:00Z")
    assert len(cut.message) == CONDITION_MESSAGE_MAX and cut.message.endswith("(cut to fit the condition)")
    (whole,) = cond.upsert([], "Failed", "True", "TrainerError", "short", at="2026-12-05T00:00:00Z")
    assert whole.message == "short"
