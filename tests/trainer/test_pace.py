"""The pace of training: step clock, stragglers and throughput drops (pure rules)."""

from __future__ import annotations

import pytest

from forge_trainer.pace import PaceJudge, PaceSettings, StepClock, slowest_over


def test_the_step_clock_keeps_medians_and_the_data_wait_share_of_recent_steps() -> None:
    clock = StepClock(window=3)
    assert clock.median_step() is None and clock.data_wait_ratio() is None
    for wait, compute in ((9.0, 9.0), (0.1, 1.0), (0.3, 1.0), (0.2, 2.0)):  # the first falls out of the window
        clock.add(wait, compute)
    assert clock.median_compute() == 1.0
    assert clock.median_step() == pytest.approx(1.3)
    assert clock.data_wait_ratio() == pytest.approx(0.6 / 4.6)


def test_a_rank_over_the_percentage_of_the_others_median_is_the_slowest() -> None:
    assert slowest_over([1.0], 130) is None
    assert slowest_over([1.0, 1.1, 1.2, 1.0], 130) is None
    assert slowest_over([1.0, 1.0, 1.5, 1.0], 130) == 2
    assert slowest_over([1.0, 1.4, 2.0, 1.0], 130) == 2  # the slowest of two slow ranks


def test_a_straggler_is_named_only_after_consecutive_read_backs() -> None:
    judge = PaceJudge(PaceSettings(straggler_percent=130, read_backs=3))
    assert judge.straggler([1.0, 2.0]) is None
    assert judge.straggler([1.0, 2.0]) is None
    found = judge.straggler([1.0, 2.0])
    assert found is not None and found.reason == "Straggler" and found.rank == 1
    assert "rank 1" in found.message and "200%" in found.message
    assert judge.straggler([1.0, 1.0]) is None  # recovered: the count starts again
    assert judge.straggler([1.0, 2.0]) is None


def test_a_throughput_drop_below_a_share_of_the_running_median() -> None:
    judge = PaceJudge(PaceSettings(drop_percent=50, read_backs=2))
    assert [judge.drop(100.0) for _ in range(3)] == [None, None, None]
    assert judge.drop(40.0) is None  # once is not yet a drop
    found = judge.drop(40.0)
    assert found is not None and found.reason == "ThroughputDrop" and "below 50%" in found.message
    assert judge.drop(100.0) is None
