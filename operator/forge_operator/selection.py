"""Checkpoint selection policies: pure functions from the trainer's reports to ``status.selected``.

The pool holds the checkpoints saved during the run and the candidates the trainer builds and evaluates at its end
(``kind: average``: the uniform average of the checkpoints in ``averageOf``; ``kind: interpolation``: WiSE-FT,
``(1 - alpha) * base + alpha * checkpoint``). Every policy weighs them like checkpoints; the reason names the kind
that won.

Percent values follow the trainer's report: forgetting % = (L_gen - L_gen_base) / L_gen_base * 100 and domain
gain % = (L_dom_base - L_dom) / L_dom_base * 100. When a report lacks them but carries losses and the status has a
baseline, they are computed here. Incomplete entries (``complete: false``) are never selected.

Ties (the same domain gain and forgetting, to the last digit reported) go to the simpler artifact: a plain
checkpoint before an average before an interpolation, then the later step, then the larger alpha.

Confidence: an entry counts as within the budget when ``forgetting + z x stderr <= budget``, with ``stderr`` the
standard error the trainer reports (paired per-sequence differences to the base model; 0 when not reported) and
``z`` the one-sided normal quantile of ``spec.checkpoints.budgetConfidencePercent`` (0 at 50%). A small held-out set
measures forgetting with noise; without the margin, an entry just under the budget on the eval set is often over it
on fresh data. When no entry qualifies with that confidence, the measured values decide and the reason says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

from forge_operator.api import (
    STATUS_TEXT_MAX,
    Baseline,
    CandidateKind,
    CandidateRef,
    CheckpointReport,
    Selected,
    SelectionPolicy,
)

# Preference among exact ties: the plainest artifact first.
KIND_RANK: dict[CandidateKind, int] = {"checkpoint": 2, "average": 1, "interpolation": 0}


@dataclass(frozen=True)
class Candidate:
    """A complete checkpoint or end-of-run candidate with its metrics (None when not measured)."""

    step: int
    uri: str
    forgetting: float | None
    gain: float | None
    kind: CandidateKind = "checkpoint"
    alpha: float | None = None
    average_of: tuple[int, ...] = ()
    forgetting_stderr: float | None = None

    @property
    def measured(self) -> bool:
        return self.forgetting is not None and self.gain is not None

    @property
    def key(self) -> tuple[CandidateKind, int, float | None, tuple[int, ...]]:
        """Identity of a report: a later report with the same key replaces an earlier one."""
        return (self.kind, self.step, self.alpha, self.average_of)

    def describe(self) -> str:
        """Names the kind, for reasons people read."""
        if self.kind == "interpolation":
            alpha = "?" if self.alpha is None else f"{self.alpha:g}"
            return f"interpolation (alpha {alpha}) of step {self.step} with the base model"
        if self.kind == "average":
            steps = list(self.average_of) or [self.step]
            return f"average of checkpoints {steps}"
        return f"checkpoint {self.step}"

    def ref(self) -> CandidateRef:
        return CandidateRef(
            step=self.step,
            uri=self.uri,
            kind=self.kind,
            alpha=self.alpha,
            average_of=list(self.average_of) or None,
            forgetting_percent=self.forgetting,
            domain_gain_percent=self.gain,
        )


@dataclass(frozen=True)
class Selection:
    """The outcome of a policy: the selected entry (if any) and, for 'pareto', the non-dominated ones."""

    selected: Selected | None
    pareto_front: list[CandidateRef] = field(default_factory=list)


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
    kind: CandidateKind = report.kind or "checkpoint"
    return Candidate(
        step=report.step,
        uri=report.uri,
        forgetting=forgetting,
        gain=gain,
        kind=kind,
        alpha=report.alpha if kind == "interpolation" else None,
        average_of=tuple(sorted(report.average_of or ())) if kind == "average" else (),
        forgetting_stderr=report.forgetting_stderr_percent,
    )


def _order(c: Candidate) -> tuple[int, int, float, tuple[int, ...]]:
    """Report order: by step, then checkpoints before the candidates built from them."""
    return (c.step, -KIND_RANK[c.kind], c.alpha if c.alpha is not None else -1.0, c.average_of)


def candidates(reports: Sequence[CheckpointReport], baseline: Baseline | None) -> list[Candidate]:
    """Complete entries in step order; an entry reported twice keeps its last report."""
    by_key: dict[tuple[CandidateKind, int, float | None, tuple[int, ...]], Candidate] = {}
    for report in reports:
        entry = candidate(report, baseline)
        if report.complete is False:
            by_key.pop(entry.key, None)
            continue
        by_key[entry.key] = entry
    return sorted(by_key.values(), key=_order)


def _gain(c: Candidate) -> float:
    return c.gain if c.gain is not None else float("-inf")


def _forgetting(c: Candidate) -> float:
    return c.forgetting if c.forgetting is not None else float("inf")


def _tie_break(c: Candidate) -> tuple[int, int, float]:
    return (KIND_RANK[c.kind], c.step, c.alpha if c.alpha is not None else 0.0)


def pareto_front(pool: Sequence[Candidate]) -> list[Candidate]:
    """Measured entries no other entry beats on both domain gain (higher) and forgetting (lower)."""
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
    return Selected(**c.ref().model_dump(), policy=policy, reason=reason[:STATUS_TEXT_MAX])


def _plain(pool: Sequence[Candidate]) -> list[Candidate]:
    return [c for c in pool if c.kind == "checkpoint"]


def _count(pool: Sequence[Candidate]) -> str:
    plain = len(_plain(pool))
    derived = len(pool) - plain
    text = f"{plain} checkpoint(s)"
    return f"{text} and {derived} end-of-run candidate(s)" if derived else text


def z_of(confidence_percent: int) -> float:
    """One-sided normal quantile: 0 at 50%, 1.64 at 95%."""
    return NormalDist().inv_cdf(confidence_percent / 100) if confidence_percent > 50 else 0.0


def _upper(c: Candidate, z: float) -> float:
    return _forgetting(c) + z * (c.forgetting_stderr or 0.0)


def _best_within_budget(
    pool: Sequence[Candidate],
    everything: Sequence[Candidate],
    budget: float,
    policy: SelectionPolicy,
    prefix: str,
    z: float = 0.0,
) -> Selected | None:
    measured = [c for c in pool if c.measured]
    confident = [c for c in measured if _upper(c, z) <= budget]
    within = confident or [c for c in measured if _forgetting(c) <= budget]
    if within:
        # Largest gain; ties go to less forgetting, then to the plainer artifact and the later step.
        best = max(within, key=lambda c: (_gain(c), -_forgetting(c), *_tie_break(c)))
        stderr = f" +- {best.forgetting_stderr:.2f}" if best.forgetting_stderr is not None and z > 0 else ""
        if not confident:
            qualifier = " by the measured forgetting (none is within it with the confidence asked)"
        elif z > 0 and any(c.forgetting_stderr is not None for c in within):
            qualifier = f" with one-sided confidence z={z:.2f}"
        else:
            qualifier = ""
        reason = (
            f"{prefix}{best.describe()}: largest domain gain ({_gain(best):.2f}%) of {_count(within)} within the "
            f"forgetting budget of {budget:g}%{qualifier} (forgetting {_forgetting(best):.2f}%{stderr})"
        )
        return _selected(best, policy, reason)
    if measured:
        least = min(measured, key=lambda c: (_forgetting(c), -_gain(c), *(-v for v in _tie_break(c))))
        reason = (
            f"{prefix}no checkpoint or candidate is within the forgetting budget of {budget:g}%: {least.describe()} "
            f"has the least forgetting ({_forgetting(least):.2f}%, domain gain {_gain(least):.2f}%)"
        )
        return _selected(least, policy, reason)
    plain = _plain(everything) or list(everything)
    if plain:
        last = plain[-1]
        return _selected(
            last, policy, f"{prefix}no checkpoint has evaluation metrics yet: the latest one ({last.describe()})"
        )
    return None


def select_best_within_budget(pool: Sequence[Candidate], budget: float, z: float = 0.0) -> Selection:
    return Selection(_best_within_budget(pool, pool, budget, "best-within-budget", "", z))


def select_pareto(pool: Sequence[Candidate], budget: float, z: float = 0.0) -> Selection:
    """Record the non-dominated set; choose from it as best-within-budget does (largest gain within the budget,
    else least forgetting)."""
    front = pareto_front(pool)
    prefix = f"pareto front of {len(front)}: " if front else ""
    chosen = _best_within_budget(front, pool, budget, "pareto", prefix, z)
    return Selection(chosen, pareto_front=[c.ref() for c in front])


def select_last(pool: Sequence[Candidate], budget: float, z: float = 0.0) -> Selection:
    """The latest saved checkpoint: end-of-run averages and interpolations are derived weights, not the run's last
    state, so 'last' never picks them (the reason counts them)."""
    plain = _plain(pool)
    if not plain:
        return Selection(None)
    last = plain[-1]
    skipped = len(pool) - len(plain)
    note = f"; {skipped} end-of-run candidate(s) not considered by 'last'" if skipped else ""
    return Selection(_selected(last, "last", f"latest complete checkpoint (step {last.step}){note}"))


POLICIES: dict[SelectionPolicy, Callable[[Sequence[Candidate], float, float], Selection]] = {
    "best-within-budget": select_best_within_budget,
    "pareto": select_pareto,
    "last": select_last,
}


def select(
    reports: Sequence[CheckpointReport],
    baseline: Baseline | None,
    policy: SelectionPolicy,
    budget_percent: float,
    confidence_percent: int = 50,
) -> Selection:
    """Apply ``policy`` to the trainer's checkpoint reports (``confidence_percent``: see the module docstring)."""
    return POLICIES[policy](candidates(reports, baseline), budget_percent, z_of(confidence_percent))


def complete_checkpoints(reports: Sequence[CheckpointReport]) -> int:
    """How many saved checkpoints (not end-of-run candidates) are complete: the operator's checkpoints gauge."""
    return len(_plain(candidates(reports, None)))
