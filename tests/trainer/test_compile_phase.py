"""training.compile: the first step is the compile phase (an event and a metric), outside tokens per second."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from forge_trainer.observers import Throughput
from tests.trainer.harness import assert_ok, merged, run_ranks, write_config


def test_throughput_counts_only_the_steps_of_its_window() -> None:
    window = Throughput()
    assert window.update(100) is None  # no step yet: no rate
    window.steps = 3
    window.started -= 2.0
    rate = window.update(100)
    assert rate is not None and 0 < rate <= 150.0  # 300 tokens in a bit over 2 s
    window.steps = 1
    window.restart()  # the compile phase: its step leaves the window
    assert window.steps == 0 and window.update(100) is None


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_compiled_run_reports_the_compile_phase(base_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = merged(
        base_config,
        training={"maxSteps": 4, "logEverySteps": 2, "compile": True},
        eval={"everySteps": 100, "domain": [], "general": []},
        checkpoints={"everySteps": 100, "exportHf": False, "candidates": {"averageLast": 0, "interpolationAlphas": []}},
    )
    started = time.monotonic()
    results = run_ranks(write_config(tmp_path / "config.json", cfg), 1, tmp_path / "ranks", timeout=450)
    assert_ok(results)
    events = results[0].events
    phases = [e for e in events if e["event"] == "compile"]
    assert len(phases) == 1 and phases[0]["step"] == 1
    assert 0 < phases[0]["seconds"] < time.monotonic() - started
    steps = {int(e["step"]): e for e in events if e["event"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) for e in steps.values())
    # the first window holds step 2 only (step 1 was the compile phase); the second steps 3 and 4
    assert steps[2]["tokensPerSecond"] > 0 and steps[4]["tokensPerSecond"] > 0
