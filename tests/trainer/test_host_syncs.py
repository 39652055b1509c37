"""The step loop reads the device back only at logging steps, and deferring the read-back changes no figure.

Real ranks (2, gloo, ZeRO-2, fp32) with host reads counted in rank 0 (tests/trainer/host_syncs.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.harness import assert_ok, merged, run_ranks, write_config
from tests.trainer.host_syncs import forge_step_syncs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

STEPS = 12
LOG_EVERY = 5
EVERY = 6  # evaluations and checkpoints: logging steps too


def config(base: dict[str, Any], tmp: Path, log_every: int) -> dict[str, Any]:
    return merged(
        base,
        training={"maxSteps": STEPS, "logEverySteps": log_every},
        eval={"everySteps": EVERY},
        checkpoints={
            "everySteps": EVERY,
            "output": str(tmp / "output"),
            "localDir": str(tmp / "local"),
            "exportHf": False,
            "candidates": {"averageLast": 0, "interpolationAlphas": []},
        },
    )


def step_figures(events: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    return {int(e["step"]): (float(e["loss"]), float(e["gradNorm"])) for e in events if e["event"] == "step"}


def test_no_host_reads_between_logging_steps(base_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.json", config(base_config, tmp_path, LOG_EVERY))
    records = forge_step_syncs(cfg, 2, tmp_path / "counted")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    logging_steps = {5, 6, 11, 12}  # every 5 steps since the last read-back, and at evaluations/checkpoints
    for r in records:
        if r["step"] in logging_steps:
            assert r["loop_reads"] >= 1, r  # the read-back itself: the counter sees it
        else:
            assert (r["loop_reads"], r["loop_collectives"]) == (0, 0), r
    # the engine's own reads (DeepSpeed, transformers) happen on every step alike
    assert all(r["engine_reads"] == records[0]["engine_reads"] for r in records)


def test_deferred_read_back_gives_every_step_the_same_figures(base_config: dict[str, Any], tmp_path: Path) -> None:
    figures = []
    for every in (1, LOG_EVERY):
        work = tmp_path / f"every{every}"
        cfg = write_config(work / "config.json", config(base_config, work, every))
        results = run_ranks(cfg, 2, work / "ranks")
        assert_ok(results)
        figures.append(step_figures(results[0].events))
    each, deferred = figures
    assert sorted(each) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) and norm > 0 for loss, norm in each.values())
    # fp32 on CPU, one thread per rank: the same arithmetic, read back later
    assert deferred == each
