"""The forgetting guard (issue 5): pure rules over training losses, gradient norms and held-out evaluations.

Every rank feeds the same numbers (losses are all-reduced, the gradient norm is global, evaluations are
all-reduced), so every rank reaches the same verdict; the loop still broadcasts rank 0's verdict to be safe.

Rules, in the order they are checked:

- ``non-finite-loss`` (NonFiniteLoss): a NaN or infinite training loss; fires at once, no grace period.
- ``loss-divergence`` (LossDiverged): the training loss exceeds ``divergenceFactor`` x the best value of its
  exponential moving average, after the grace period.
- ``grad-norm-spikes`` (GradNormSpikes): ``gradSpikeSteps`` consecutive observed steps with a gradient norm above
  ``gradSpikeFactor`` x the running median of the norms seen so far, after the grace period.
- ``forgetting-budget`` (LearningRateTooHigh or ForgettingBudgetExceeded): forgetting above the budget (by more
  than z x its standard error, z of ``confidencePercent``, the ForgeJob's checkpoints.budgetConfidencePercent: a
  small held-out set must not stop a run on noise) AND still
  rising per unit of cumulative learning rate (the least-squares slope of forgetting against the sum of the
  learning rates so far, over the last ``slopeWindowEvals`` evaluations, is > 0), or falling too slowly to be back
  within the budget by the end of the run: the projection (current + slope x the learning-rate sum the schedule
  still has to give) stays over the budget. LearningRateTooHigh when the projection exceeds ``lrTooHighFactor`` x
  the budget, else ForgettingBudgetExceeded.
- ``no-domain-progress`` (NoDomainProgress): the domain gain has not improved by ``minDomainGainPercent``
  points over the last ``noProgressEvals`` evaluations.

Forgetting and progress rules wait for the stability gap (general loss often rises early and recovers): they do
not fire before ``graceSteps`` (default 10% of maxSteps) and before ``graceEvals`` evaluations after the baseline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from forge_trainer.config import ForgettingAction, ForgettingSettings
from forge_trainer.evaluate import EvalResult

NON_FINITE = "NonFiniteLoss"
DIVERGED = "LossDiverged"
GRAD_SPIKES = "GradNormSpikes"
LR_TOO_HIGH = "LearningRateTooHigh"
OVER_BUDGET = "ForgettingBudgetExceeded"
NO_PROGRESS = "NoDomainProgress"
REASONS = (NON_FINITE, DIVERGED, GRAD_SPIKES, LR_TOO_HIGH, OVER_BUDGET, NO_PROGRESS)
FORGETTING_REASONS = (LR_TOO_HIGH, OVER_BUDGET)

# Bounds of the learning-rate cut suggested from budget / forgetting (never below 1/10, always a cut).
LR_FACTOR_BOUNDS = (0.1, 0.5)
# Rebalance: the general share is raised by half the domain excess over this floor, by at least 5 points.
REBALANCE_FLOOR_PERCENT = 50
REBALANCE_MIN_STEP = 5
SMOOTHING = 0.1  # weight of the newest loss in the moving average


def round_down(value: float) -> str:
    """Two significant digits, rounded towards zero, as a decimal string: 1.18e-5 -> '1.1e-05'."""
    if value <= 0 or not math.isfinite(value):
        return "0"
    exponent = math.floor(math.log10(value)) - 1
    mantissa = math.floor(value / 10.0**exponent + 1e-9)
    return f"{mantissa * 10.0**exponent:.2g}"


def suggest_learning_rate(learning_rate: float, forgetting: float | None, budget: float) -> str:
    """A lower peak rate: scaled by budget / forgetting, within LR_FACTOR_BOUNDS."""
    ratio = budget / forgetting if forgetting and forgetting > 0 else LR_FACTOR_BOUNDS[0]
    ratio = min(LR_FACTOR_BOUNDS[1], max(LR_FACTOR_BOUNDS[0], ratio))
    return round_down(learning_rate * ratio)


def rebalanced_percent(domain_percent: int) -> int | None:
    """A lower domain share: half the excess over REBALANCE_FLOOR_PERCENT, at least REBALANCE_MIN_STEP points.

    None when the share is already at or below the floor (more replay would mostly cost domain gain).
    """
    if domain_percent <= REBALANCE_FLOOR_PERCENT:
        return None
    cut = max(REBALANCE_MIN_STEP, math.ceil((domain_percent - REBALANCE_FLOOR_PERCENT) / 2))
    return max(REBALANCE_FLOOR_PERCENT, domain_percent - cut)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs; None with fewer than two distinct xs."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass(frozen=True)
class Verdict:
    """A rule that fired: what the trainer does about it and what a person should change."""

    step: int
    reason: str
    rule: str
    message: str
    action: ForgettingAction
    learning_rate: str | None = None
    domain_percent: int | None = None

    def status(self) -> dict[str, Any]:
        """status.earlyStop (camelCase)."""
        out: dict[str, Any] = {
            "step": self.step,
            "reason": self.reason,
            "rule": self.rule,
            "message": self.message,
            "action": self.action,
        }
        sug = {k: v for k, v in (("learningRate", self.learning_rate), ("domainPercent", self.domain_percent)) if v}
        if sug:
            out["suggestion"] = sug
        return out


@dataclass
class Guard:
    """The guard's state over one run; ``observe_step`` and ``observe_eval`` return a verdict when a rule fires."""

    settings: ForgettingSettings
    max_steps: int
    learning_rate: float
    domain_percent: int
    lr_sum: float = 0.0
    ema: float | None = None
    best_ema: float | None = None
    grad_norms: list[float] = field(default_factory=list)
    spike_run: int = 0
    evals: list[tuple[float, float | None, float | None]] = field(default_factory=list)  # lr_sum, forget, gain
    fired: list[str] = field(default_factory=list)
    can_rebalance: bool = True  # false without general sources: rebalance degrades to warn
    lr_of: Callable[[int], float] | None = None  # the schedule: learning rate of 0-based step i

    @property
    def grace_steps(self) -> int:
        g = self.settings.grace_steps
        return g if g is not None else math.ceil(0.1 * self.max_steps)

    def remaining_lr_sum(self, step: int) -> float:
        """Learning-rate sum still to come after ``step`` steps: from the schedule, or at the peak rate."""
        if self.lr_of is None:
            return max(0, self.max_steps - step) * self.learning_rate
        return sum(self.lr_of(i) for i in range(step, self.max_steps))

    # ---- training steps --------------------------------------------------------------------------------------

    def observe_step(self, step: int, loss: float, lr: float, grad_norm: float | None = None) -> Verdict | None:
        """One optimizer step's loss (all ranks' token mean), its learning rate and, if known, its gradient norm."""
        self.lr_sum += lr
        s = self.settings
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            what = f"training loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            return self._verdict(
                step,
                NON_FINITE,
                "non-finite-loss",
                f"{what} at step {step}: the weights are no longer usable; lower learningRate to "
                f"{round_down(self.learning_rate * LR_FACTOR_BOUNDS[0])} (or check the data and precision)",
                force_stop=True,
                lr=round_down(self.learning_rate * LR_FACTOR_BOUNDS[0]),
            )
        self.ema = loss if self.ema is None else (1 - SMOOTHING) * self.ema + SMOOTHING * loss
        self.best_ema = self.ema if self.best_ema is None else min(self.best_ema, self.ema)
        past_grace = step > self.grace_steps
        if past_grace and self.best_ema > 0 and loss > s.divergence_factor * self.best_ema:
            lr_s = round_down(self.learning_rate * LR_FACTOR_BOUNDS[1])
            return self._verdict(
                step,
                DIVERGED,
                "loss-divergence",
                f"training loss {loss:.4g} at step {step} is {loss / self.best_ema:.1f}x its best smoothed value "
                f"{self.best_ema:.4g} (limit {s.divergence_factor:g}x): lower learningRate to {lr_s}",
                lr=lr_s,
            )
        if grad_norm is not None:
            verdict = self._grad(step, grad_norm, past_grace)
            self.grad_norms.append(grad_norm)
            if verdict is not None:
                return verdict
        return None

    def _grad(self, step: int, norm: float, past_grace: bool) -> Verdict | None:
        s = self.settings
        if len(self.grad_norms) < 3:
            return None
        median = statistics.median(self.grad_norms[-200:])
        if median > 0 and norm > s.grad_spike_factor * median:
            self.spike_run += 1
        else:
            self.spike_run = 0
        if past_grace and self.spike_run >= s.grad_spike_steps:
            lr_s = round_down(self.learning_rate * LR_FACTOR_BOUNDS[1])
            return self._verdict(
                step,
                GRAD_SPIKES,
                "grad-norm-spikes",
                f"gradient norm above {s.grad_spike_factor:g}x its running median {median:.3g} for "
                f"{self.spike_run} steps in a row (now {norm:.3g} at step {step}): lower learningRate to {lr_s} "
                f"or add warmupSteps",
                lr=lr_s,
            )
        return None

    # ---- evaluations ------------------------------------------------------------------------------------------

    def observe_eval(self, ev: EvalResult) -> Verdict | None:
        """A held-out evaluation after the baseline (step > 0)."""
        broken = [
            f"{name} held-out loss {value}"
            for name, value in (("domain", ev.domain_loss), ("general", ev.general_loss))
            if value is not None and not math.isfinite(value)
        ]
        if broken:  # finite training figures but broken weights: never saved, never selected
            return self._verdict(
                ev.step,
                NON_FINITE,
                "non-finite-loss",
                f"{' and '.join(broken)} at step {ev.step}: the weights are no longer usable; lower learningRate to "
                f"{round_down(self.learning_rate * LR_FACTOR_BOUNDS[0])} (or check the data and precision)",
                force_stop=True,
                lr=round_down(self.learning_rate * LR_FACTOR_BOUNDS[0]),
            )
        self.evals.append((self.lr_sum, ev.forgetting_percent, ev.domain_gain_percent))
        if ev.step <= self.grace_steps or len(self.evals) <= self.settings.grace_evals:
            return None
        return self._forgetting(ev) or self._progress(ev)

    def _forgetting(self, ev: EvalResult) -> Verdict | None:
        s = self.settings
        f = ev.forgetting_percent
        stderr = ev.forgetting_stderr_percent or 0.0
        margin = NormalDist().inv_cdf(s.confidence_percent / 100) * stderr
        if f is None or f - margin <= s.budget_percent:
            return None  # within the budget, or not over it by more than the measurement's noise
        window = [(x, y) for x, y, _ in self.evals[-s.slope_window_evals :] if y is not None]
        k = slope([x for x, _ in window], [y for _, y in window])
        if k is None:
            return None
        projected = f + k * self.remaining_lr_sum(ev.step)
        if k <= 0 and projected <= s.budget_percent:
            return None  # the stability gap closing in time
        steep = projected > s.lr_too_high_factor * s.budget_percent
        lr_s = suggest_learning_rate(self.learning_rate, f, s.budget_percent)
        dp = rebalanced_percent(self.domain_percent)
        advice = f"lower learningRate to {lr_s}"
        if dp is not None:
            advice += f" or raise the general share to {100 - dp}% (domainPercent {dp})"
        trend = "still rising" if k > 0 else "not falling fast enough"
        noise = f" +- {stderr:.2f}" if stderr else ""
        what = (
            f"forgetting {f:.2f}%{noise} at step {ev.step} is over the budget of {s.budget_percent:g}% and {trend} "
            f"({k:.3g} points per unit of cumulative learning rate; projected {max(projected, 0.0):.1f}% by the end)"
        )
        return self._verdict(
            ev.step, LR_TOO_HIGH if steep else OVER_BUDGET, "forgetting-budget", f"{what}: {advice}", lr=lr_s, dp=dp
        )

    def _progress(self, ev: EvalResult) -> Verdict | None:
        s = self.settings
        gains = [g for _, _, g in self.evals if g is not None]
        if len(gains) <= s.no_progress_evals:
            return None
        before = max(gains[: -s.no_progress_evals])
        recent = max(gains[-s.no_progress_evals :])
        if recent >= before + s.min_domain_gain_percent:
            return None
        return self._verdict(
            ev.step,
            NO_PROGRESS,
            "no-domain-progress",
            f"domain gain has not improved by {s.min_domain_gain_percent:g} points over the last "
            f"{s.no_progress_evals} evaluations (best {before:.2f}% before, {recent:.2f}% since; step {ev.step}): "
            "the run can end here; a later checkpoint would mostly add forgetting",
        )

    # ---- verdicts ------------------------------------------------------------------------------------------

    def _verdict(
        self,
        step: int,
        reason: str,
        rule: str,
        message: str,
        force_stop: bool = False,
        lr: str | None = None,
        dp: int | None = None,
    ) -> Verdict | None:
        """The verdict with its action; a warning (or rebalance) fires once per reason, a stop always."""
        action: ForgettingAction = self.settings.action
        if force_stop:
            action = "stop"
        elif action == "rebalance" and (reason not in FORGETTING_REASONS or dp is None or not self.can_rebalance):
            action = "warn"
        if action != "stop" and reason in self.fired:
            return None
        self.fired.append(reason)
        return Verdict(step, reason, rule, message, action, lr, dp)

    def rebalanced(self, domain_percent: int) -> None:
        """The mix changed (action rebalance): later suggestions start from the new share; it may fire again."""
        self.domain_percent = domain_percent
        self.fired = [r for r in self.fired if r not in FORGETTING_REASONS]
        self.evals.clear()

    # ---- state ------------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Saved with every checkpoint, so that a resumed run keeps its history."""
        return {
            "lrSum": self.lr_sum,
            "ema": self.ema,
            "bestEma": self.best_ema,
            "gradNorms": self.grad_norms[-200:],
            "spikeRun": self.spike_run,
            "evals": [list(e) for e in self.evals],
            "fired": list(self.fired),
            "domainPercent": self.domain_percent,
        }

    def load_json(self, doc: dict[str, Any]) -> None:
        """Inverse of to_json."""
        self.lr_sum = float(doc.get("lrSum", 0.0))
        self.ema = doc.get("ema")
        self.best_ema = doc.get("bestEma")
        self.grad_norms = [float(x) for x in doc.get("gradNorms", [])]
        self.spike_run = int(doc.get("spikeRun", 0))
        self.evals = [(float(a), b, c) for a, b, c in doc.get("evals", [])]
        self.fired = list(doc.get("fired", []))
        self.domain_percent = int(doc.get("domainPercent", self.domain_percent))
