"""Checkpoint selection policies (pure), with the end-of-run candidates (averages, WiSE-FT interpolations)."""

from __future__ import annotations

from typing import Any

import pytest

from forge_operator.api import Baseline, CheckpointReport, ForgeJobStatus
from forge_operator.selection import candidates, complete_checkpoints, pareto_front, select


def report(step: int, forgetting: float | None, gain: float | None, **extra: Any) -> CheckpointReport:
    return CheckpointReport(
        step=step, uri=f"s3://o/step-{step:08d}/", forgetting_percent=forgetting, domain_gain_percent=gain, **extra
    )


def interpolation(step: int, alpha: float, forgetting: float, gain: float, **extra: Any) -> CheckpointReport:
    return CheckpointReport(
        step=step,
        uri=f"s3://o/step-{step:08d}-wise-{alpha}/",
        kind="interpolation",
        alpha=alpha,
        forgetting_percent=forgetting,
        domain_gain_percent=gain,
        **extra,
    )


def average(steps: list[int], forgetting: float, gain: float, **extra: Any) -> CheckpointReport:
    return CheckpointReport(
        step=max(steps),
        uri=f"s3://o/average-{'-'.join(map(str, steps))}/",
        kind="average",
        average_of=steps,
        forgetting_percent=forgetting,
        domain_gain_percent=gain,
        **extra,
    )


REPORTS = [report(100, 0.5, 8.0), report(200, 1.5, 15.0), report(300, 2.5, 20.0), report(400, 1.9, 14.0)]
# The trainer's end-of-run candidates: the interpolations trade gain for forgetting along the base-to-400 line, the
# average of the last three checkpoints smooths them.
CANDIDATES = [
    interpolation(400, 0.25, 0.4, 5.0),
    interpolation(400, 0.5, 0.9, 10.0),
    interpolation(400, 0.75, 1.4, 12.0),
    average([200, 300, 400], 1.7, 16.5),
]


def test_best_within_budget_takes_the_largest_gain_inside_the_budget() -> None:
    selection = select(REPORTS, None, "best-within-budget", 2)
    assert selection.selected is not None
    assert selection.selected.step == 200 and selection.selected.kind == "checkpoint"
    assert selection.selected.policy == "best-within-budget"
    reason = selection.selected.reason
    assert reason.startswith("checkpoint 200: largest domain gain (15.00%)") and "3 checkpoint(s)" in reason
    assert selection.pareto_front == []


def test_budget_is_inclusive() -> None:
    selected = select(REPORTS, None, "best-within-budget", 2.5).selected
    assert selected is not None and selected.step == 300


def test_when_nothing_fits_the_least_forgetting_wins_and_the_reason_says_so() -> None:
    selected = select(REPORTS, None, "best-within-budget", 0).selected
    assert selected is not None and selected.step == 100
    assert selected.reason.startswith("no checkpoint or candidate is within the forgetting budget of 0%")
    assert "checkpoint 100 has the least forgetting (0.50%" in selected.reason


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
    assert [(p.step, p.kind, p.uri) for p in selection.pareto_front] == [
        (100, "checkpoint", "s3://o/step-00000100/"),
        (200, "checkpoint", "s3://o/step-00000200/"),
        (300, "checkpoint", "s3://o/step-00000300/"),
    ]
    assert selection.pareto_front[1].forgetting_percent == 1.5
    assert selection.pareto_front[1].domain_gain_percent == 15.0
    assert selection.selected is not None and selection.selected.step == 200
    assert selection.selected.reason.startswith("pareto front of 3: checkpoint 200: ")


def test_pareto_with_equal_points_keeps_both() -> None:
    same = [report(100, 1.0, 10.0), report(200, 1.0, 10.0)]
    assert [c.step for c in pareto_front(candidates(same, None))] == [100, 200]


def test_last_takes_the_latest_complete_checkpoint() -> None:
    selected = select(REPORTS, None, "last", 2).selected
    assert selected is not None and selected.step == 400 and selected.policy == "last"


# --- end-of-run candidates -----------------------------------------------------------------------------------


def test_an_average_that_beats_every_checkpoint_wins_and_the_reason_names_it() -> None:
    selected = select([*REPORTS, *CANDIDATES], None, "best-within-budget", 2).selected
    assert selected is not None
    assert (selected.kind, selected.step, selected.average_of) == ("average", 400, [200, 300, 400])
    assert selected.uri == "s3://o/average-200-300-400/"
    assert selected.reason.startswith("average of checkpoints [200, 300, 400]: largest domain gain (16.50%)")
    assert "of 3 checkpoint(s) and 4 end-of-run candidate(s) within the forgetting budget of 2%" in selected.reason


def test_an_interpolation_wins_when_only_it_fits_a_tight_budget() -> None:
    selected = select([*REPORTS, *CANDIDATES], None, "best-within-budget", 1).selected
    assert selected is not None
    assert (selected.kind, selected.step, selected.alpha) == ("interpolation", 400, 0.5)
    assert selected.reason.startswith("interpolation (alpha 0.5) of step 400 with the base model: largest domain gain")
    assert selected.forgetting_percent == 0.9 and selected.domain_gain_percent == 10.0


def test_when_nothing_fits_the_least_forgetting_candidate_is_named() -> None:
    selected = select([*REPORTS, *CANDIDATES], None, "best-within-budget", 0).selected
    assert selected is not None and (selected.kind, selected.alpha) == ("interpolation", 0.25)
    assert "interpolation (alpha 0.25) of step 400 with the base model has the least forgetting" in selected.reason


def test_pareto_front_includes_candidates() -> None:
    selection = select([*REPORTS, *CANDIDATES], None, "pareto", 2)
    front = [(p.kind, p.step, p.alpha) for p in selection.pareto_front]
    # Only checkpoint 400 (1.9%, 14) is dominated (by 200: 1.5%, 15); every candidate trades gain for forgetting.
    assert front == [
        ("checkpoint", 100, None),
        ("checkpoint", 200, None),
        ("checkpoint", 300, None),
        ("average", 400, None),
        ("interpolation", 400, 0.25),
        ("interpolation", 400, 0.5),
        ("interpolation", 400, 0.75),
    ]
    assert selection.pareto_front[3].average_of == [200, 300, 400]
    assert selection.selected is not None and selection.selected.kind == "average"
    assert selection.selected.policy == "pareto"


def test_exact_ties_prefer_the_plain_checkpoint() -> None:
    tied = [report(400, 1.0, 10.0), interpolation(400, 0.75, 1.0, 10.0), average([300, 400], 1.0, 10.0)]
    selected = select(tied, None, "best-within-budget", 2).selected
    assert selected is not None and selected.kind == "checkpoint"
    least = select(tied, None, "best-within-budget", 0).selected
    assert least is not None and least.kind == "checkpoint"


def test_last_ignores_end_of_run_candidates_and_says_so() -> None:
    selected = select([*REPORTS, *CANDIDATES], None, "last", 2).selected
    assert selected is not None and (selected.kind, selected.step) == ("checkpoint", 400)
    assert "4 end-of-run candidate(s) not considered by 'last'" in selected.reason


def test_candidates_of_the_same_step_are_distinct_entries() -> None:
    pool = candidates([report(400, 1.9, 14.0), *CANDIDATES], None)
    assert len(pool) == 5
    # Step order, and within a step the checkpoint before what was built from it.
    assert [(c.kind, c.alpha) for c in pool][:2] == [("checkpoint", None), ("average", None)]
    again = candidates([*CANDIDATES, interpolation(400, 0.5, 0.8, 11.0)], None)
    assert len(again) == 4 and next(c for c in again if c.alpha == 0.5).gain == 11.0
    withdrawn = candidates([*CANDIDATES, interpolation(400, 0.5, 0.8, 11.0, complete=False)], None)
    assert [c.alpha for c in withdrawn if c.kind == "interpolation"] == [0.25, 0.75]


def test_without_metrics_the_fallback_is_a_plain_checkpoint() -> None:
    reports = [
        CheckpointReport(step=100, uri="s3://o/100"),
        CheckpointReport(step=100, uri="s3://o/100-wise-0.5", kind="interpolation", alpha=0.5),
    ]
    selected = select(reports, None, "best-within-budget", 2).selected
    assert selected is not None and selected.uri == "s3://o/100"


def test_the_checkpoints_gauge_counts_complete_saved_checkpoints_only() -> None:
    reports = [*REPORTS, report(500, 0.1, 50.0, complete=False), *CANDIDATES]
    assert complete_checkpoints(reports) == 4


def test_a_pareto_front_of_bare_steps_from_an_older_operator_is_dropped() -> None:
    status = ForgeJobStatus.model_validate({"paretoFront": [100, 200]})
    assert status.pareto_front == []


def test_the_confidence_margin_prefers_a_checkpoint_surely_within_the_budget() -> None:
    reports = [
        report(10, 1.2, 8.0, forgetting_stderr_percent=0.1),
        report(20, 1.9, 12.0, forgetting_stderr_percent=0.2),  # 1.9 + 1.64 x 0.2 = 2.23 > 2: not sure
    ]
    sure = select(reports, None, "best-within-budget", 2, 95).selected
    assert sure is not None and sure.step == 10
    assert "with one-sided confidence z=1.64" in sure.reason and "+- 0.10" in sure.reason
    # 50% compares the measured value alone, as before standard errors existed.
    measured = select(reports, None, "best-within-budget", 2, 50).selected
    assert measured is not None and measured.step == 20
    # Without a reported standard error the measured value decides, whatever the confidence.
    plain = [report(10, 1.2, 8.0), report(20, 1.9, 12.0)]
    assert (select(plain, None, "best-within-budget", 2, 99).selected or sure).step == 20


def test_when_nothing_is_surely_within_the_budget_the_measured_value_decides_and_says_so() -> None:
    reports = [
        report(10, 1.8, 8.0, forgetting_stderr_percent=0.3),
        report(20, 1.95, 12.0, forgetting_stderr_percent=0.3),
    ]
    chosen = select(reports, None, "best-within-budget", 2, 95).selected
    assert chosen is not None and chosen.step == 20
    assert "by the measured forgetting (none is within it with the confidence asked)" in chosen.reason
    pareto = select(reports, None, "pareto", 2, 95).selected
    assert pareto is not None and pareto.step == 20


@pytest.mark.parametrize(("percent", "z"), [(50, 0.0), (80, 0.8416), (95, 1.6449), (99, 2.3263)])
def test_confidence_percent_maps_to_the_one_sided_normal_quantile(percent: int, z: float) -> None:
    from forge_operator.selection import z_of

    assert z_of(percent) == pytest.approx(z, abs=1e-4)
