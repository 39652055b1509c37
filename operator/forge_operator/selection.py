"""Checkpoint selection policies: pure functions from the trainer's checkpoint reports to ``status.selected``.

Percent values follow the trainer's report: forgetting % = (L_gen - L_gen_base) / L_gen_base * 100 and domain
gain % = (L_dom_base - L_dom) / L_dom_base * 100. When a report lacks them but carries losses and the status has a
baseline, they are computed here. Incomplete checkpoints (``complete: false``) are never selected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from forge_operator.api import Baseline, CheckpointReport, Selected, SelectionPolicy


@dataclass(frozen=True)
class Candidate:
    """A complete checkpoint with its metrics (None when not measured)."""

    step: int
    uri: str
    forgetting: float | None
    gain: float | None

    @property
    def measured(self) -> bool:
        return self.forgetting is not None and self.gain is not None


@dataclass(frozen=True)
class Selection:
    """The outcome of a policy: the selected checkpoint (if any) and, for 'pareto', the non-dominated steps."""

    selected: Selected | None
    pareto_front: list[int] = field(default_factory=list)


def _relative_percent(numerator: float, base: float | None) -> float | None:
    if base is None or base == 0:
        return None
    return 100.0 * numerator / base


def candidate(report: CheckpointReport, baseline: Baseline | None) -> Candidate:
    forgetting = report.forgetting_percent
    gain = report.domain_gain_percent
    base_general = baseline.general_loss if baseline else None
    base_domain = baseline.domain_loss if baseline else None
    if forgetting is None and report.general_loss is not None and base_general is not None:
        forgetting = _relative_percent(report.general_loss - base_general, base_general)
    if gain is None and report.domain_loss is not None and base_domain is not None:
        gain = _relative_percent(base_domain - report.domain_loss, base_domain)
    return Candidate(step=report.step, uri=report.uri, forgetting=forgetting, gain=gain)


def candidates(reports: Sequence[CheckpointReport], baseline: Baseline | None) -> list[Candidate]:
    """Complete checkpoints in step order; a step reported twice keeps its last report."""
    by_step: dict[int, Candidate] = {}
    for report in reports:
        if report.complete is False:
            by_step.pop(report.step, None)
            continue
        by_step[report.step] = candidate(report, baseline)
    return [by_step[step] for step in sorted(by_step)]


def _gain(c: Candidate) -> float:
    return c.gain if c.gain is not None else float("-inf")


def _forgetting(c: Candidate) -> float:
    return c.forgetting if c.forgetting is not None else float("inf")


def pareto_front(pool: Sequence[Candidate]) -> list[Candidate]:
    """Measured candidates no other candidate beats on both domain gain (higher) and forgetting (lower)."""
    measured = [c for c in pool if c.measured]

    def dominated(c: Candidate) -> bool:
        return any(
            _gain(o) >= _gain(c)
            and _forgetting(o) <= _forgetting(c)
            and (_gain(o) > _gain(c) or _forgetting(o) < _forgetting(c))
            for o in measured
        )

    return [c for c in measured if not dominated(c)]


def _selected(c: Candidate, policy: SelectionPolicy, reason: str) -> Selected:
    return Selected(
        step=c.step,
        uri=c.uri,
        policy=policy,
        reason=reason,
        forgetting_percent=c.forgetting,
        domain_gain_percent=c.gain,
    )


def _best_within_budget(
    pool: Sequence[Candidate], everything: Sequence[Candidate], budget: float, policy: SelectionPolicy, prefix: str
) -> Selected | None:
    measured = [c for c in pool if c.measured]
    within = [c for c in measured if _forgetting(c) <= budget]
    if within:
        # Largest gain; ties go to less forgetting, then to the later step.
        best = max(within, key=lambda c: (_gain(c), -_forgetting(c), c.step))
        reason = (
            f"{prefix}largest domain gain ({_gain(best):.2f}%) of {len(within)} checkpoint(s) within the forgetting "
            f"budget of {budget:g}% (forgetting {_forgetting(best):.2f}%)"
        )
        return _selected(best, policy, reason)
    if measured:
        least = min(measured, key=lambda c: (_forgetting(c), -_gain(c), -c.step))
        reason = (
            f"{prefix}no checkpoint is within the forgetting budget of {budget:g}%: least forgetting "
            f"({_forgetting(least):.2f}%, domain gain {_gain(least):.2f}%)"
        )
        return _selected(least, policy, reason)
    if everything:
        last = everything[-1]
        return _selected(last, policy, f"{prefix}no checkpoint has evaluation metrics yet: the latest one")
    return None


def select_best_within_budget(pool: Sequence[Candidate], budget: float) -> Selection:
    return Selection(_best_within_budget(pool, pool, budget, "best-within-budget", ""))


def select_pareto(pool: Sequence[Candidate], budget: float) -> Selection:
    front = pareto_front(pool)
    steps = [c.step for c in front]
    prefix = f"pareto front {steps}: " if front else ""
    return Selection(_best_within_budget(front, pool, budget, "pareto", prefix), pareto_front=steps)


def select_last(pool: Sequence[Candidate], budget: float) -> Selection:
    if not pool:
        return Selection(None)
    last = pool[-1]
    return Selection(_selected(last, "last", f"latest complete checkpoint (step {last.step})"))


POLICIES: dict[SelectionPolicy, Callable[[Sequence[Candidate], float], Selection]] = {
    "best-within-budget": select_best_within_budget,
    "pareto": select_pareto,
    "last": select_last,
}


def select(
    reports: Sequence[CheckpointReport], baseline: Baseline | None, policy: SelectionPolicy, budget_percent: float
) -> Selection:
    """Apply ``policy`` to the trainer's checkpoint reports."""
    return POLICIES[policy](candidates(reports, baseline), budget_percent)
