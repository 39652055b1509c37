"""The pace of training: step clock, stragglers and throughput drops (pure rules)."""

from __future__ import annotations

import pytest

from forge_trainer.errors import ConfigError
from forge_trainer.pace import (
    Degraded,
    Fault,
    Findings,
    OwnTime,
    PaceJudge,
    PaceSettings,
    PaceWatch,
    Peer,
    StepClock,
    local_peer,
    pace_status,
    parse_fault,
    slowest_over,
)


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
    # Twice as slow but by 20 ms a step: noise on shared CPUs, not a straggler (the default gap is 50 ms).
    assert slowest_over([0.02, 0.04], 130, PaceSettings().straggler_min_gap_seconds) is None
    assert slowest_over([0.02, 0.08], 130, PaceSettings().straggler_min_gap_seconds) == 1


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


def test_a_lasting_drop_is_judged_against_the_level_before_it() -> None:
    judge = PaceJudge(PaceSettings(drop_percent=50, read_backs=2))
    for _ in range(2):
        judge.drop(100.0)
    found = [judge.drop(10.0) for _ in range(40)]  # low figures never become the reference
    assert found[0] is None and all(f is not None and f.median == 100.0 for f in found[1:])


def test_the_fault_hook_names_a_rank_its_seconds_and_first_step() -> None:
    assert parse_fault(None, 1) == Fault() and parse_fault("", 0) == Fault()
    assert parse_fault("1:0.5", 1) == Fault(0.5, 1)
    assert parse_fault("1:0.5", 0) == Fault()
    assert parse_fault("0:2:7", 0) == Fault(2.0, 7)
    for bad in ("1", "x:1", "1:y", "-1:1", "1:-1", "1:1:0", "1:1:2:3"):
        with pytest.raises(ConfigError, match="FORGE_FAULT_SLEEP_PER_STEP"):
            parse_fault(bad, 1)


def test_own_time_sums_the_forward_passes_and_sleeps_once_per_faulty_step() -> None:
    own = OwnTime(Fault(0.05, 2))
    own.begin(1)
    with own.forward():
        pass
    assert own.seconds < 0.05  # before the fault's first step
    own.begin(2)
    for _ in range(3):  # three micro-batches: one sleep
        with own.forward():
            pass
    assert 0.05 <= own.seconds < 0.1


def test_each_rank_puts_its_figure_at_its_place() -> None:
    assert PaceWatch(PaceSettings(), 2, 4).slots(0.25) == [0.0, 0.0, 0.25, 0.0]
    assert PaceWatch(PaceSettings(), 0, 2).slots(None) == [0.0, 0.0]


def test_the_watch_holds_a_straggler_until_it_stays_away_as_long() -> None:
    watch = PaceWatch(PaceSettings(straggler_percent=130, read_backs=2), 0, 2)
    assert watch.observe([1.0, 0.0], None, True).straggler is None  # a rank without a figure: not judged
    assert watch.observe([1.0, 2.0], None, True).straggler is None
    named = watch.observe([1.0, 2.0], None, True).straggler
    assert named is not None and named.rank == 1 and named.value == 2.0 and named.median == 1.0
    assert watch.observe([1.0, 1.0], None, True).straggler == named  # one read-back within limits: still held
    assert watch.observe([1.0, 1.0], None, True).straggler is None


def test_a_window_after_a_restart_is_not_judged_for_a_drop() -> None:
    watch = PaceWatch(PaceSettings(drop_percent=50, read_backs=1), 0, 1)
    watch.observe([1.0], 100.0, True)
    assert watch.observe([1.0], 10.0, False).drop is None  # right after an evaluation: not counted
    assert watch.observe([1.0], 10.0, True).drop is not None


def test_the_pace_status_names_the_rank_its_pod_and_node_with_the_figures() -> None:
    straggler = Degraded("Straggler", "slow", rank=1, value=0.51234, median=0.01, read_backs=5)
    drop = Degraded("ThroughputDrop", "low", value=40.04, median=100.0, read_backs=5)
    peers = [Peer("job-master-0", "node-a"), Peer("job-worker-0", "node-b")]
    doc = pace_status(Findings(straggler, drop), 2, peers, 30, "2026-01-01T00:00:00Z")
    assert doc["straggler"] == {
        "rank": 1, "pod": "job-worker-0", "node": "node-b", "stepSeconds": 0.5123, "medianSeconds": 0.01,
        "readBacks": 5,
    }  # fmt: skip
    assert doc["throughputDrop"] == {"tokensPerSecond": 40.0, "medianTokensPerSecond": 100.0, "readBacks": 5}
    cleared = pace_status(Findings(), 2, peers, 31, "2026-01-01T00:00:01Z")
    assert cleared["straggler"] is None and cleared["throughputDrop"] is None  # null deletes them in a merge patch


def test_the_pod_and_node_come_from_the_downward_api_or_the_hostname() -> None:
    assert local_peer({"FORGE_POD_NAME": "p", "FORGE_NODE_NAME": "n", "HOSTNAME": "h"}) == Peer("p", "n")
    assert local_peer({"HOSTNAME": "h"}) == Peer("h", "unknown")
