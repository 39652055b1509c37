"""The learning-rate probe: the fit, the projection and the choice worked by hand; then a real run (one rank, CPU)
that probes, trains at the chosen rate and, rerun, does not probe again."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from forge_trainer.config import ProbeSettings, TrainingSettings
from forge_trainer.probe import (
    PROBE_FILE,
    MultipleResult,
    ProbePoint,
    ProbeRecord,
    SlopeFit,
    assess,
    choose,
    cumulative_lr,
    eval_steps,
    fit_forgetting_slope,
    full_run_cumulative_lr,
    probe_training,
    scaled_training,
)
from tests.trainer.harness import assert_ok, merged, run_ranks, write_config


def training(**overrides: Any) -> TrainingSettings:
    doc: dict[str, Any] = {
        "learningRate": 1e-3,
        "schedule": "constant",
        "warmupSteps": 0,
        "microBatchSize": 1,
        "maxSteps": 100,
        "probe": {"steps": 10},
    }
    doc.update(overrides)
    return TrainingSettings.model_validate(doc)


# ---- the fit -------------------------------------------------------------------------------------------------------


def test_fit_is_anchored_at_the_origin_with_a_standard_error() -> None:
    exact = fit_forgetting_slope([(1.0, 2.0), (2.0, 4.0)])  # on the line y = 2x: no residual
    assert (exact.slope, exact.stderr, exact.dof) == pytest.approx((2.0, 0.0, 1))
    assert exact.interval() == pytest.approx((2.0, 2.0))
    single = fit_forgetting_slope([(2.0, 1.0)])  # the line through the origin and the point; no error estimate
    assert (single.slope, single.stderr, single.interval()) == (0.5, None, None)
    # (1, 1), (2, 3): slope (1 + 6) / (1 + 4) = 1.4; residuals -0.4, 0.2 -> variance 0.2 over 1 dof;
    # stderr sqrt(0.2 / 5) = 0.2; 90% interval 1.4 +- 6.314 x 0.2 (Student's t, 1 dof)
    noisy = fit_forgetting_slope([(1.0, 1.0), (2.0, 3.0)])
    assert (noisy.slope, noisy.stderr) == pytest.approx((1.4, 0.2))
    assert noisy.interval() == pytest.approx((1.4 - 1.2628, 1.4 + 1.2628))
    # no free intercept: a free line through these points would cross zero forgetting at x = 1/9, not at 0
    assert fit_forgetting_slope([(1.0, -1.0)]).slope == -1.0  # a fall (general loss improved)
    assert fit_forgetting_slope([(0.0, 3.0)]) == SlopeFit(0.0, None)  # no spread in x: no slope


# ---- the schedule ----------------------------------------------------------------------------------------------------


def test_full_run_cumulative_learning_rate_follows_the_schedule() -> None:
    # constant: 100 steps x 2e-3
    assert full_run_cumulative_lr(training(), 2e-3) == pytest.approx(0.2)
    # warmup 2: factors 1/2, 1, then 1 for 98 more steps: 99.5 x lr
    assert full_run_cumulative_lr(training(warmupSteps=2), 1e-3) == pytest.approx(0.0995)
    # cosine over 4 steps: 1, (1 + cos(pi/4)) / 2, 1/2, (1 - cos(pi/4)) / 2 -> 2.5 x lr
    cosine = training(schedule="cosine", maxSteps=4, probe=None)
    assert full_run_cumulative_lr(cosine, 1e-2) == pytest.approx(0.025)
    # a floor of 10% of the peak: 0.1 + 0.9 x factor -> 4 x 0.1 + 0.9 x 2.5 = 2.65 x lr, at any peak
    floor = training(schedule="cosine", maxSteps=4, minLearningRate=1e-4, probe=None)
    assert full_run_cumulative_lr(floor, 1e-3) == pytest.approx(2.65e-3)
    assert full_run_cumulative_lr(floor, 4e-3) == pytest.approx(4 * 2.65e-3)
    # the cumulative rate of the first steps of a schedule
    assert cumulative_lr(training(warmupSteps=2), 3) == pytest.approx(2.5e-3)


def test_probe_runs_are_short_constant_and_scaled() -> None:
    t = training(
        learningRate=2e-4, minLearningRate=2e-5, schedule="cosine", warmupSteps=30, maxSteps=1000, compile=True
    )
    t = t.model_copy(update={"probe": ProbeSettings(steps=20)})
    run = probe_training(t, 4.0)
    assert run.learning_rate == pytest.approx(8e-4)
    assert (run.schedule, run.max_steps, run.min_learning_rate) == ("constant", 20, 0.0)
    assert run.warmup_steps == 1, "30/1000 of 20 steps, rounded up"
    assert run.probe is None and run.compile is False
    assert probe_training(t.model_copy(update={"warmup_steps": 0}), 1.0).warmup_steps == 0
    real = scaled_training(t, 0.5)
    assert (real.learning_rate, real.min_learning_rate) == pytest.approx((1e-4, 1e-5))
    assert (real.schedule, real.max_steps, real.warmup_steps) == ("cosine", 1000, 30)
    assert eval_steps(20, 4) == [5, 10, 15, 20]
    assert eval_steps(10, 3) == [4, 7, 10]
    assert eval_steps(5, 5) == [1, 2, 3, 4, 5]
    assert eval_steps(7, 1) == [7]


# ---- projection and choice ----------------------------------------------------------------------------------------


def test_assess_projects_to_the_whole_run() -> None:
    # 2 x 1e-3 over 100 constant steps: cumulative 0.2. Points (0.02, 0.5%), (0.04, 1%): slope 25 points per unit
    # of cumulative rate through the origin -> 25 x 0.2 = 5% at the end of the run (0.2 is within 30 x 0.04).
    points = [ProbePoint(10, 0.02, 0.5), ProbePoint(20, 0.04, 1.0)]
    result = assess(2.0, training(), points, finite=True)
    assert result.learning_rate == pytest.approx(2e-3)
    assert result.full_run_cumulative_lr == pytest.approx(0.2)
    assert result.slope == pytest.approx(25.0)
    assert result.projected_percent == pytest.approx(5.0) and not result.extrapolation_capped
    assert (result.projected_low_percent, result.projected_high_percent) == pytest.approx((5.0, 5.0))
    assert result.measured_percent == 1.0 and result.usable
    broken = assess(64.0, training(), points[:1], finite=False)
    assert broken.projected_percent is None and not broken.usable and broken.measured_percent == 0.5


def test_the_projection_stops_at_thirty_times_the_probed_rate_and_carries_an_interval() -> None:
    # 1000 steps at 2e-3: cumulative 2.0, fifty times the probe's 0.04. The line is followed to 30 x 0.04 = 1.2 only.
    points = [ProbePoint(10, 0.02, 0.4), ProbePoint(20, 0.04, 1.1)]
    result = assess(2.0, training(maxSteps=1000), points, finite=True)
    slope = (0.02 * 0.4 + 0.04 * 1.1) / (0.02**2 + 0.04**2)
    assert result.slope == pytest.approx(slope) and result.extrapolation_capped
    assert result.projected_percent == pytest.approx(slope * 1.2)
    assert result.projected_low_percent is not None and result.projected_high_percent is not None
    assert result.projected_low_percent < result.projected_percent < result.projected_high_percent
    choice = choose([result], budget_percent=50.0)
    assert "90% interval" in choice.reason and "not the whole run's" in choice.reason
    again = MultipleResult.from_json(result.to_json())
    assert again == result


def result(multiplier: float, projected: float | None, finite: bool = True) -> MultipleResult:
    return MultipleResult(multiplier, 1e-3 * multiplier, (), finite, 0.1 * multiplier, 1.0, projected)


def test_choose_the_highest_multiple_within_the_budget() -> None:
    choice = choose([result(0.5, 1.0), result(1.0, 1.8), result(2.0, 2.5), result(4.0, 9.0)], 2.0)
    assert (choice.multiplier, choice.learning_rate) == (1.0, 1e-3)
    assert "1x is the highest multiple projected within" in choice.reason
    assert "1.80% <= 2%" in choice.reason and "2x is projected at 2.50%" in choice.reason
    # equal to the budget is within it; the highest probed multiple says so
    top = choose([result(1.0, 0.5), result(2.0, 2.0)], 2.0)
    assert top.multiplier == 2.0 and "highest multiple probed" in top.reason
    # the highest within wins, even above one that is over (noise between multiples)
    assert choose([result(0.5, 0.5), result(2.0, 2.5), result(4.0, 1.5)], 2.0).multiplier == 4.0


def test_a_non_finite_probe_is_never_chosen() -> None:
    choice = choose([result(0.5, 0.2), result(1.0, -3.0, finite=False), result(4.0, 1.0, finite=False)], 2.0)
    assert choice.multiplier == 0.5 and "1x had a non-finite loss" in choice.reason
    assert choose([result(1.0, math.nan)], 2.0).reason.startswith("every probe run had a non-finite loss")


def test_when_every_multiple_is_over_the_budget_the_lowest_is_chosen() -> None:
    choice = choose([result(4.0, 30.0), result(0.5, 3.0), result(1.0, 6.0)], 2.0)
    assert choice.multiplier == 0.5
    assert "even the lowest multiple, 0.5x, is projected over the forgetting budget: 3.00% > 2%" in choice.reason
    # the lowest finite one, when the lowest probed was not finite
    assert choose([result(0.5, None, finite=False), result(1.0, 6.0)], 2.0).multiplier == 1.0
    # every run non-finite: the lowest (the real run's longer warmup may keep it finite)
    assert choose([result(2.0, None, finite=False), result(1.0, None, finite=False)], 2.0).multiplier == 1.0
    with pytest.raises(ValueError):
        choose([], 2.0)


def test_the_record_round_trips_and_reports_status() -> None:
    points = (ProbePoint(5, 0.005, 0.1, 3.0), ProbePoint(10, 0.01, 0.2, 5.5))
    results = (assess(1.0, training(), points, True, 1.5), assess(8.0, training(), points[:1], False))
    record = ProbeRecord(1e-3, 2.0, 10, results, choose(results, 2.0))
    doc = json.loads(json.dumps(record.to_json()))
    assert doc["version"] == 1 and doc["multiplier"] == 1.0 and doc["learningRate"] == 1e-3
    assert ProbeRecord.from_json(doc) == record
    assert record.status() == {
        "learningRate": 1e-3,
        "multiplier": 1.0,
        "reason": record.choice.reason,
        "multiples": [
            {
                "multiplier": 1.0,
                "learningRate": 1e-3,
                "projectedForgettingPercent": 2.0,
                "projectedLowPercent": 2.0,  # the two points lie on a line through the origin: no spread
                "projectedHighPercent": 2.0,
                "measuredForgettingPercent": 0.2,
            },
            {"multiplier": 8.0, "learningRate": 8e-3, "measuredForgettingPercent": 0.1},
        ],
    }
    with pytest.raises(ValueError, match="version"):
        ProbeRecord.from_json({**doc, "version": 2})
    with pytest.raises(ValueError, match="malformed"):
        ProbeRecord.from_json({k: v for k, v in doc.items() if k != "multiples"})


# ---- a real run -----------------------------------------------------------------------------------------------------

STEPS = 20
BASE_LR = 1e-4
MULTIPLIERS = [0.5, 4.0, 64.0]
BUDGET = 3.0


def events_of(results: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in results[0].events if e["event"] == kind]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_probe_picks_a_rate_the_run_trains_at_and_a_rerun_reuses_it(
    base_config: dict[str, Any], pretrained: Path, tmp_path: Path
) -> None:
    cfg = merged(
        base_config,
        data={"domainPercent": 100},
        eval={"everySteps": 10, "klTopK": 0},
        training={
            "learningRate": BASE_LR,
            "schedule": "constant",
            "warmupSteps": 0,
            "maxSteps": STEPS,
            "probe": {"multipliers": MULTIPLIERS, "steps": 4, "evaluations": 2, "evalMaxTokens": 512},
        },
        forgetting={"budgetPercent": BUDGET, "action": "warn"},
        checkpoints={"everySteps": 10, "exportHf": False, "candidates": {"averageLast": 0, "interpolationAlphas": []}},
    )
    cfg["model"]["base"] = str(pretrained)
    config = write_config(tmp_path / "config.json", cfg)
    started = time.monotonic()
    results = run_ranks(config, 1, tmp_path / "run", timeout=240)
    elapsed = time.monotonic() - started
    assert_ok(results)

    probes = events_of(results, "probe")
    assert [e["multiplier"] for e in probes] == MULTIPLIERS, "each multiple once, ascending"
    assert all(len(e["points"]) == 2 and [p["step"] for p in e["points"]] == [2, 4] for e in probes), probes
    (chosen,) = events_of(results, "probeResult")
    record = json.loads((Path(cfg["checkpoints"]["output"]) / PROBE_FILE).read_text())
    assert (record["multiplier"], record["learningRate"], record["reason"]) == (
        chosen["multiplier"],
        chosen["learningRate"],
        chosen["reason"],
    )
    projected = {m["multiplier"]: m["projectedForgettingPercent"] for m in record["multiples"]}
    within = [m for m, p in projected.items() if p is not None and p <= BUDGET]
    assert within, f"no multiple within the budget: {projected}"
    assert chosen["multiplier"] == max(within), projected
    assert chosen["multiplier"] < 64.0
    very_high = next(m for m in record["multiples"] if m["multiplier"] == 64.0)
    assert very_high["finite"] and very_high["projectedForgettingPercent"] > BUDGET, very_high
    assert very_high["measuredForgettingPercent"] > max(
        m["measuredForgettingPercent"] for m in record["multiples"] if m["multiplier"] < 64.0
    ), "a higher rate forgets more"

    # the run trains at the chosen rate (constant schedule, no warmup), and only the run reports steps
    lr = chosen["learningRate"]
    steps = events_of(results, "step")
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(e["lr"] == pytest.approx(lr) for e in steps), (lr, steps[:2])
    assert lr == pytest.approx(BASE_LR * chosen["multiplier"])

    # a restart resumes at the chosen rate without probing again (from the checkpoint of step 10) ...
    shutil.rmtree(Path(cfg["checkpoints"]["output"]) / "step-00000020")
    again = run_ranks(config, 1, tmp_path / "rerun", timeout=120)
    assert_ok(again)
    assert not events_of(again, "probe") and not events_of(again, "probeResult")
    reused = events_of(again, "probeReused")[0]
    assert (reused["source"], reused["learningRate"]) == ("checkpoint", pytest.approx(lr))
    resumed = events_of(again, "step")
    assert [e["step"] for e in resumed] == list(range(11, STEPS + 1))
    assert all(e["lr"] == pytest.approx(lr) for e in resumed)

    # ... and a start before any checkpoint takes the rate from the probe's record
    for step_dir in Path(cfg["checkpoints"]["output"]).glob("step-*"):
        shutil.rmtree(step_dir)
    fresh = run_ranks(config, 1, tmp_path / "fresh", timeout=120)
    assert_ok(fresh)
    assert not events_of(fresh, "probe")
    reused = events_of(fresh, "probeReused")[0]
    assert (reused["source"], reused["multiplier"]) == ("record", chosen["multiplier"])
    assert all(e["lr"] == pytest.approx(lr) for e in events_of(fresh, "step"))
    print(f"probe run {elapsed:.1f}s")
