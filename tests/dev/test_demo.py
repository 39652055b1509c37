"""The demo's pure parts: evaluation points, table rows, plot data and the outcome it requires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from forge_dev.demo import (
    DEMO_MANIFEST,
    NAIVE_MANIFEST,
    TABLE_HEADER,
    History,
    demo_problems,
    evaluation_point,
    plot,
    plot_series,
    stop_lines,
    table_row,
)

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


def status_at(step: int, forgetting: float, gain: float, state: str = "Running", **extra: Any) -> dict[str, Any]:
    return {
        "state": state,
        "progress": {"step": step, "totalSteps": 60},
        "latest": {"forgettingPercent": forgetting, "domainGainPercent": gain, "tokensPerSecond": 812.5},
        **extra,
    }


STOP = {
    "step": 15,
    "reason": "LearningRateTooHigh",
    "rule": "forgetting-budget",
    "message": "forgetting 9.1% > budget 5% and rising",
    "action": "stop",
    "suggestion": {"learningRate": "1.6e-04"},
}


def naive_history(*points: tuple[int, float, float]) -> History:
    history = History()
    for step, forgetting, gain in points:
        history.add(status_at(step, forgetting, gain))
    return history


def test_an_evaluation_point_needs_a_step_and_a_forgetting_figure() -> None:
    assert evaluation_point({}) is None
    assert evaluation_point({"progress": {"step": 4}, "latest": {"tokensPerSecond": 9.0}}) is None
    assert evaluation_point(status_at(10, 1.5, 20.25)) == {"step": 10.0, "forgetting": 1.5, "gain": 20.25}


def test_history_keeps_one_point_per_evaluation() -> None:
    history = History()
    assert history.add(status_at(5, 1.0, 10.0))
    assert not history.add(status_at(7, 1.0, 10.0))  # progress moved, no new evaluation
    assert history.add(status_at(10, 2.0, 12.0))
    assert not history.add(status_at(10, 2.0, 12.0))
    assert not history.add({"progress": {"step": 11}})
    assert [p["step"] for p in history.points] == [5.0, 10.0]


def test_table_rows_name_each_job_under_the_header() -> None:
    row = table_row("support-bot-naive", status_at(15, 9.125, 30.5, "EarlyStopped"))
    assert row.split() == ["support-bot-naive", "EarlyStopped", "15/60", "30.50%", "9.12%", "812.50", "-"]
    assert table_row("support-bot", {}).split() == ["support-bot", "Pending", "0/?", "-", "-", "-", "-"]
    assert len(TABLE_HEADER.split()) == 8  # DOMAIN GAIN is two words: a column per field of a row
    assert TABLE_HEADER.index("STATE") == row.index("EarlyStopped")


def test_plot_series_marks_the_selected_checkpoint_and_the_guard_stop() -> None:
    good = status_at(
        60, 3.0, 40.0, "Succeeded", selected={"step": 40, "forgettingPercent": 2.5, "domainGainPercent": 38.0}
    )
    history = History([{"step": s, "forgetting": f, "gain": g} for s, f, g in ((20, 1.0, 20.0), (10, 0.5, 10.0))])
    history.add(status_at(40, 2.5, 38.0))
    series = plot_series("support-bot", history, good)
    assert series.steps == [10.0, 20.0, 40.0] and series.forgetting == [0.5, 1.0, 2.5] and series.gain[-1] == 38.0
    assert series.selected == (40.0, 38.0, 2.5) and series.stopped is None
    assert series.selected_label == "checkpoint step 40"
    stopped = status_at(15, 9.0, 30.0, "EarlyStopped", earlyStop=STOP)
    naive = plot_series("naive", naive_history((5, 2.0, 15.0), (10, 6.0, 25.0), (15, 9.0, 30.0)), stopped)
    assert naive.stopped == (15.0, 30.0, 9.0) and naive.stop_reason == "LearningRateTooHigh"
    assert naive.selected is None


def test_the_plot_is_written(tmp_path: Path) -> None:
    good = plot_series("support-bot", naive_history((10, 0.5, 10.0), (20, 1.0, 20.0)), status_at(20, 1.0, 20.0))
    naive = plot_series(
        "naive",
        naive_history((5, 2.0, 15.0), (10, 9.0, 30.0)),
        status_at(10, 9.0, 30.0, "EarlyStopped", earlyStop=STOP),
    )
    png = tmp_path / "plot.png"
    plot([good, naive], 5.0, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_passes_only_when_the_mixed_run_succeeds_and_the_naive_one_is_stopped() -> None:
    good = status_at(60, 3.0, 40.0, "Succeeded", selected={"step": 40})
    stopped = status_at(15, 9.0, 30.0, "EarlyStopped", earlyStop=STOP)
    seen = naive_history((5, 2.0, 15.0), (15, 9.0, 30.0))
    assert demo_problems(good, stopped, seen) == []
    assert "not Succeeded" in demo_problems({**good, "state": "Failed"}, stopped, seen)[0]
    assert "selected no checkpoint" in demo_problems({**good, "selected": None}, stopped, seen)[0]
    finished = status_at(60, 20.0, 50.0, "Succeeded")
    assert "the guard did not stop it" in demo_problems(good, finished, seen)[0]
    warned = {**stopped, "earlyStop": {**STOP, "action": "warn"}}
    assert "no stop verdict" in demo_problems(good, warned, seen)[0]
    # the evaluation that triggered the stop must reach the status before the stop
    late = naive_history((5, 2.0, 15.0), (14, 6.0, 25.0))
    assert "step 15" in demo_problems(good, stopped, late)[0]


def test_the_stop_is_told_with_its_reason_and_advice() -> None:
    advice = "forgetting 9.1% > budget 5%: lower learningRate to 1.6e-4 (the guard stops the run)"
    status = status_at(
        15,
        9.0,
        30.0,
        "EarlyStopped",
        earlyStop=STOP,
        conditions=[{"type": "ForgettingWithinBudget", "status": "False", "message": advice}],
    )
    text = "\n".join(stop_lines(status))
    assert "step 15: LearningRateTooHigh (rule forgetting-budget)" in text
    assert STOP["message"] in text and "learningRate 1.6e-04" in text and advice in text
    assert stop_lines(status_at(60, 1.0, 2.0, "Succeeded")) == []


def test_the_two_demo_jobs_differ_the_way_the_demo_says() -> None:
    good = yaml.safe_load((REPO_ROOT / DEMO_MANIFEST).read_text())["spec"]
    naive = yaml.safe_load((REPO_ROOT / NAIVE_MANIFEST).read_text())["spec"]
    assert good["data"]["domainPercent"] < 100 and naive["data"]["domainPercent"] == 100
    assert "general" not in naive["data"] and naive["forgetting"]["action"] == "stop"
    assert naive["eval"]["everySteps"] < good["eval"]["everySteps"]
    assert float(naive["training"]["learningRate"]) >= 5 * 2e-5  # several times the calibrated SFT rate
    assert naive["checkpoints"]["output"] != good["checkpoints"]["output"]
    assert naive["forgetting"]["budgetPercent"] == good["forgetting"]["budgetPercent"]  # one budget line on the plot
