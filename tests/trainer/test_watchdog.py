"""The hang watchdog: unit rules with a fake clock, and a drill with real ranks where one is frozen in a collective."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from forge_trainer.errors import EXIT_HANG
from forge_trainer.watchdog import HangWatchdog, WatchdogSettings, hang_limit
from tests.trainer.harness import merged, start_ranks, write_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_is_a_multiple_of_the_recent_median_with_a_floor() -> None:
    settings = WatchdogSettings(multiple=10, floor_seconds=60)
    assert hang_limit([], settings) == 60  # no median yet: the floor
    assert hang_limit([1.0, 2.0, 100.0], settings) == 60  # median 2 s x 10 < floor
    assert hang_limit([10.0, 12.0, 11.0], settings) == 110


def test_a_step_over_its_limit_is_a_hang_and_a_finished_step_is_not() -> None:
    clock = FakeClock()
    hung: list[str] = []
    dog = HangWatchdog(WatchdogSettings(multiple=5, floor_seconds=3, window=4), 1, hung.append, clock)
    dog.close()  # the test drives check() itself
    for step in range(1, 5):
        dog.step_started(step)
        clock.now += 1.0
        dog.step_ended()
    assert dog.check() is None  # idle between steps
    dog.step_started(5, "train step")
    clock.now += 4.9
    assert dog.check() is None  # 5 x median 1 s
    clock.now += 0.2
    message = dog.check()
    assert message is not None and message.startswith("hang watchdog: rank 1, step 5 (train step) has run 5s")
    assert "exits with the retryable code 202" in message


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_frozen_in_a_collective_is_caught_well_before_the_distributed_timeout(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    cfg = merged(
        base_config,
        data={"maxRepetition": 100},
        training={"maxSteps": 400, "logEverySteps": 1},
        eval={"everySteps": 1000},  # freeze the peer mid-training: evaluation and saves are not timed
        checkpoints={"everySteps": 1000},
        watchdog={"multiple": 5, "floorSeconds": 5},
    )
    ranks = start_ranks(write_config(tmp_path / "c.json", cfg), 2, tmp_path / "run")  # FORGE_DIST_TIMEOUT_S=120
    try:
        ranks.wait_for_event(lambda e: e["event"] == "step" and e["step"] >= 10, timeout=240)
        ranks.procs[1].send_signal(signal.SIGSTOP)  # rank 1 stops answering; rank 0 waits in its next collective
        frozen_at = time.monotonic()
        ranks.procs[0].wait(110)
        caught_after = time.monotonic() - frozen_at
    finally:
        ranks.procs[1].send_signal(signal.SIGCONT)
        ranks.kill()
    rank0 = ranks.collect()[0]
    assert rank0.returncode == EXIT_HANG, rank0.describe()
    assert caught_after < 100, f"caught after {caught_after:.0f}s: that is the distributed timeout, not the watchdog"
    assert "hang watchdog: rank 0" in rank0.stderr
    assert "most recent call first" in rank0.stderr and "forge_trainer" in rank0.stderr  # every thread's stack
