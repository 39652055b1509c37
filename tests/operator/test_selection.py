"""Checkpoint selection policies (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from forge_operator.api import Baseline, CheckpointReport
from forge_operator.selection import candidates, pareto_front, select


def report(step: int, forgetting: float | None, gain: float | None, **extra: Any) -> CheckpointReport:
    return CheckpointReport(
        step=step, uri=f"s3://o/step-{step:08d}/", forgetting_percent=forgetting, domain_gain_percent=gain, **extra
    )


REPORTS = [report(100, 0.5, 8.0), report(200, 1.5, 15.0), report(300, 2.5, 20.0), report(400, 1.9, 14.0)]


def test_best_within_budget_takes_the_largest_gain_inside_the_budget() -> None:
    selection = select(REPORTS, None, "best-within-budget", 2)
    assert selection.selected is not None
    assert selection.selected.step == 200
    assert selection.selected.policy == "best-within-budget"
    assert (
        "largest domain gain (15.00%)" in selection.selected.reason and "3 checkpoint(s)" in selection.selected.reason
    )
    assert selection.pareto_front == []


def test_budget_is_inclusive() -> None:
    selected = select(REPORTS, None, "best-within-budget", 2.5).selected
    assert selected is not None and selected.step == 300


def test_when_nothing_fits_the_least_forgetting_wins_and_the_reason_says_so() -> None:
    selected = select(REPORTS, None, "best-within-budget", 0).selected
    assert selected is not None and selected.step == 100
    assert "no checkpoint is within the forgetting budget of 0%" in selected.reason


def test_ties_go_to_less_forgetting_then_to_the_later_step() -> None:
    tied = [report(100, 1.0, 10.0), report(200, 0.5, 10.0), report(300, 0.5, 10.0)]
    selected = select(tied, None, "best-within-budget", 2).selected
    assert selected is not None and selected.step == 300


def test_incomplete_checkpoints_are_never_selected() -> None:
    reports = [*REPORTS, report(500, 0.1, 50.0, complete=False)]
    selected = select(reports, None, "best-within-budget", 2).selected
    assert selected is not None and selected.step == 200
    last = select(reports, None, "last", 2).selected
    assert last is not None and last.step == 400


def test_a_later_report_of_the_same_step_replaces_the_earlier_one() -> None:
    reports = [report(100, 0.5, 8.0, complete=False), report(100, 0.5, 8.0, complete=True), report(200, 9.0, 9.0)]
    assert [c.step for c in candidates(reports, None)] == [100, 200]
    withdrawn = [report(100, 0.5, 8.0), report(100, 0.5, 8.0, complete=False)]
    assert candidates(withdrawn, None) == []


def test_percentages_are_derived_from_losses_and_the_baseline() -> None:
    reports = [
        CheckpointReport(step=100, uri="s3://o/100", domain_loss=1.8, general_loss=1.62),
        CheckpointReport(step=200, uri="s3://o/200", domain_loss=1.5, general_loss=1.70),
    ]
    baseline = Baseline(domain_loss=2.0, general_loss=1.6)
    pool = candidates(reports, baseline)
    assert pool[0].forgetting == pytest.approx(1.25) and pool[0].gain == pytest.approx(10.0)
    assert pool[1].forgetting == pytest.approx(6.25) and pool[1].gain == pytest.approx(25.0)
    selected = select(reports, baseline, "best-within-budget", 2).selected
    assert selected is not None and selected.step == 100
    assert selected.forgetting_percent == pytest.approx(1.25)


def test_without_metrics_the_latest_checkpoint_is_selected() -> None:
    reports = [CheckpointReport(step=100, uri="s3://o/100"), CheckpointReport(step=200, uri="s3://o/200")]
    selected = select(reports, None, "best-within-budget", 2).selected
    assert selected is not None and selected.step == 200 and "no checkpoint has evaluation metrics" in selected.reason


def test_no_checkpoints_no_selection() -> None:
    for policy in ("best-within-budget", "pareto", "last"):
        assert select([], None, policy, 2).selected is None  # type: ignore[arg-type]


def test_pareto_front_keeps_only_non_dominated_checkpoints() -> None:
    front = pareto_front(candidates(REPORTS, None))
    # 400 (1.9%, 14) is dominated by 200 (1.5%, 15); the others trade gain for forgetting.
    assert [c.step for c in front] == [100, 200, 300]
    selection = select(REPORTS, None, "pareto", 2)
    assert selection.pareto_front == [100, 200, 300]
    assert selection.selected is not None and selection.selected.step == 200
    assert selection.selected.reason.startswith("pareto front [100, 200, 300]: ")


def test_pareto_with_equal_points_keeps_both() -> None:
    same = [report(100, 1.0, 10.0), report(200, 1.0, 10.0)]
    assert [c.step for c in pareto_front(candidates(same, None))] == [100, 200]


def test_last_takes_the_latest_complete_checkpoint() -> None:
    selected = select(REPORTS, None, "last", 2).selected
    assert selected is not None and selected.step == 400 and selected.policy == "last"
