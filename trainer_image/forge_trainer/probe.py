"""The learning-rate probe (pure): settings of the probe runs, the forgetting fit, the projection and the choice.

Before training, ``probe_run.LearningRateProbe`` trains the base model for ``training.probe.steps`` steps at each
multiple of the configured learning rate, on the real mixed stream, and evaluates forgetting a few times. This module
turns those measurements into a learning rate, on the assumption (from the continual-learning literature) that
forgetting grows roughly linearly with the cumulative learning rate, i.e. the sum of the learning rates of the steps so
far:

- per multiple, a least-squares line through the origin, ``forgetting = slope x cumulative lr`` (the base model
  forgets nothing, exactly), with the standard error of the slope (:func:`fit_forgetting_slope`);
- projected to the cumulative learning rate the whole run would give at that multiple, with the run's own schedule
  (:func:`full_run_cumulative_lr`), but never more than ``MAX_EXTRAPOLATION`` times the cumulative rate the probe
  measured: a line fitted over a short stretch says little about a run fifty times longer (forgetting bends over
  with training, and the guard watches the real run), so the projection beyond that is capped and the reason says so;
- with a 90% interval from the slope's standard error (Student's t), shown beside the point;
- the choice: the highest multiple projected within ``forgetting.budgetPercent``, else the lowest (:func:`choose`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from forge_trainer.config import TrainingSettings
from forge_trainer.engine import lr_factor
from forge_trainer.report import r4

PROBE_FILE = "forge-lr-probe.json"
RECORD_VERSION = 1


# ---- the probe runs ---------------------------------------------------------------------------------------------


def probe_training(training: TrainingSettings, multiplier: float) -> TrainingSettings:
    """The training settings of one probe run: learningRate x multiplier, probe.steps steps, the run's warmup scaled
    down to them, then constant (no decay: every step adds the full rate), no torch.compile, no nested probe."""
    probe = training.probe
    if probe is None:
        raise ValueError("training.probe is not set")
    warmup = -(-training.warmup_steps * probe.steps // training.max_steps)  # ceil, <= probe.steps
    return TrainingSettings.model_validate(
        {
            **training.model_dump(),
            "learning_rate": training.learning_rate * multiplier,
            "min_learning_rate": 0.0,
            "schedule": "constant",
            "warmup_steps": warmup,
            "max_steps": probe.steps,
            "compile": False,
            "probe": None,
        }
    )


def scaled_training(training: TrainingSettings, multiplier: float) -> TrainingSettings:
    """The run's own settings at a multiple of its learning rate (the schedule's floor scales with it)."""
    return training.model_copy(
        update={
            "learning_rate": training.learning_rate * multiplier,
            "min_learning_rate": training.min_learning_rate * multiplier,
        }
    )


def eval_steps(steps: int, evaluations: int) -> list[int]:
    """``evaluations`` evenly spaced steps of a probe run (1-based), the last one its final step."""
    return [-(-steps * k // evaluations) for k in range(1, evaluations + 1)]


def cumulative_lr(training: TrainingSettings, steps: int) -> float:
    """Sum of the learning rates of the first ``steps`` optimizer steps of ``training``'s schedule."""
    return training.learning_rate * sum(lr_factor(training, i) for i in range(steps))


def full_run_cumulative_lr(training: TrainingSettings, lr: float) -> float:
    """Sum of the learning rates over the whole run (training.maxSteps, the run's schedule) at peak rate ``lr``.

    The schedule's shape does not depend on the peak: the floor (minLearningRate) scales with it.
    """
    return lr * sum(lr_factor(training, i) for i in range(training.max_steps))


# ---- the fit and the choice ----------------------------------------------------------------------------------------


# Beyond this many times the cumulative learning rate a probe run reached, its line is not extrapolated. At the
# defaults (20 probe steps at a constant rate, a 1,000-step cosine run) the run reaches about 25x: not capped. The
# real-model benchmark (issue 15) is where this figure should be calibrated.
MAX_EXTRAPOLATION = 30.0
# One-sided 95% quantiles of Student's t by degrees of freedom (a two-sided 90% interval); the normal one beyond.
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
Z95 = 1.645


@dataclass(frozen=True)
class SlopeFit:
    """forgetting % = slope x cumulative learning rate, fitted through the origin."""

    slope: float
    stderr: float | None
    """Standard error of the slope; None with a single point (no residual to estimate it from)."""
    dof: int = 0
    """Degrees of freedom of the residuals (points - 1)."""

    def interval(self) -> tuple[float, float] | None:
        """The slope's 90% interval, or None without a standard error."""
        if self.stderr is None:
            return None
        half = T95.get(self.dof, Z95) * self.stderr
        return self.slope - half, self.slope + half


def fit_forgetting_slope(points: Sequence[tuple[float, float]]) -> SlopeFit:
    """The least-squares slope through the origin of forgetting % against the cumulative learning rate.

    The base model forgets nothing at zero cumulative rate, exactly: the origin is not a noisy measurement to fit
    a free intercept to, but the line's anchor. Slope 0 when every x is 0.
    """
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    sxx = sum(x * x for x in xs)
    if sxx <= 0:
        return SlopeFit(0.0, None)
    slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sxx
    dof = len(xs) - 1
    if dof < 1:
        return SlopeFit(slope, None)
    residual = sum((y - slope * x) ** 2 for x, y in zip(xs, ys, strict=True)) / dof
    return SlopeFit(slope, math.sqrt(residual / sxx), dof)


@dataclass(frozen=True)
class ProbePoint:
    """One evaluation of a probe run."""

    step: int
    cumulative_lr: float
    forgetting_percent: float
    domain_gain_percent: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "cumulativeLearningRate": self.cumulative_lr,
            "forgettingPercent": self.forgetting_percent,
            "domainGainPercent": self.domain_gain_percent,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> ProbePoint:
        gain = doc.get("domainGainPercent")
        return ProbePoint(
            int(doc["step"]),
            float(doc["cumulativeLearningRate"]),
            float(doc["forgettingPercent"]),
            None if gain is None else float(gain),
        )


@dataclass(frozen=True)
class MultipleResult:
    """One probed multiple: its measurements, the fitted line and the forgetting projected to the whole run."""

    multiplier: float
    learning_rate: float
    points: tuple[ProbePoint, ...]
    finite: bool
    """Every training loss and evaluation of the probe run was finite (a run with a NaN loss ends at once)."""
    full_run_cumulative_lr: float
    slope: float | None = None
    projected_percent: float | None = None
    """Forgetting at the end of the whole run at this multiple; None when the probe run was not finite."""
    seconds: float = 0.0
    projected_low_percent: float | None = None
    projected_high_percent: float | None = None
    """The projection's 90% interval (from the slope's standard error); None with a single evaluation."""
    extrapolation_capped: bool = False
    """The run goes more than MAX_EXTRAPOLATION times past the probe's cumulative rate: projected at that cap."""

    @property
    def measured_percent(self) -> float | None:
        """Forgetting at the last evaluation of the probe run."""
        return self.points[-1].forgetting_percent if self.points else None

    @property
    def usable(self) -> bool:
        """Finite, with a finite projection: a candidate for the choice."""
        return self.finite and self.projected_percent is not None and math.isfinite(self.projected_percent)

    def to_json(self) -> dict[str, Any]:
        return {
            "multiplier": self.multiplier,
            "learningRate": self.learning_rate,
            "finite": self.finite,
            "points": [p.to_json() for p in self.points],
            "fullRunCumulativeLearningRate": self.full_run_cumulative_lr,
            "slope": self.slope,
            "projectedForgettingPercent": self.projected_percent,
            "projectedLowPercent": self.projected_low_percent,
            "projectedHighPercent": self.projected_high_percent,
            "extrapolationCapped": self.extrapolation_capped,
            "measuredForgettingPercent": self.measured_percent,
            "seconds": round(self.seconds, 3),
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> MultipleResult:
        def opt(key: str) -> float | None:
            value = doc.get(key)
            return None if value is None else float(value)

        return MultipleResult(
            multiplier=float(doc["multiplier"]),
            learning_rate=float(doc["learningRate"]),
            points=tuple(ProbePoint.from_json(p) for p in doc.get("points", [])),
            finite=bool(doc["finite"]),
            full_run_cumulative_lr=float(doc["fullRunCumulativeLearningRate"]),
            slope=opt("slope"),
            projected_percent=opt("projectedForgettingPercent"),
            seconds=float(doc.get("seconds", 0.0)),
            projected_low_percent=opt("projectedLowPercent"),
            projected_high_percent=opt("projectedHighPercent"),
            extrapolation_capped=bool(doc.get("extrapolationCapped", False)),
        )


def assess(
    multiplier: float,
    training: TrainingSettings,
    points: Sequence[ProbePoint],
    finite: bool,
    seconds: float = 0.0,
) -> MultipleResult:
    """Fit one multiple's points and project them to the whole run (``training``: the run's configured settings)."""
    lr = training.learning_rate * multiplier
    full = full_run_cumulative_lr(training, lr)
    if not finite or not points:
        return MultipleResult(multiplier, lr, tuple(points), False, full, seconds=seconds)
    fit = fit_forgetting_slope([(p.cumulative_lr, p.forgetting_percent) for p in points])
    reach = MAX_EXTRAPOLATION * max(p.cumulative_lr for p in points)
    at = min(full, reach)
    interval = fit.interval()
    return MultipleResult(
        multiplier,
        lr,
        tuple(points),
        True,
        full,
        fit.slope,
        fit.slope * at,
        seconds,
        None if interval is None else interval[0] * at,
        None if interval is None else interval[1] * at,
        full > reach,
    )


@dataclass(frozen=True)
class Choice:
    """The multiple the run trains at, and why."""

    multiplier: float
    learning_rate: float
    reason: str


def _interval_text(r: MultipleResult) -> str:
    if r.projected_low_percent is None or r.projected_high_percent is None:
        return ""
    return f" (90% interval {r.projected_low_percent:.2f} to {r.projected_high_percent:.2f}%)"


def _cap_text(r: MultipleResult) -> str:
    if not r.extrapolation_capped:
        return ""
    return (
        f"; projected at {MAX_EXTRAPOLATION:g}x the probe's cumulative learning rate, not the whole run's "
        "(a line fitted that short is not extrapolated further; the guard watches the rest)"
    )


def choose(results: Sequence[MultipleResult], budget_percent: float) -> Choice:
    """The highest multiple whose projected forgetting is within the budget; if none, the lowest multiple (among the
    probe runs with a finite loss, which are the only ones ever chosen unless every run had a non-finite loss)."""
    if not results:
        raise ValueError("no probe results to choose from")
    usable = sorted((r for r in results if r.usable), key=lambda r: r.multiplier)
    within = [r for r in usable if r.projected_percent is not None and r.projected_percent <= budget_percent]
    if within:
        best = within[-1]
        reason = (
            f"{best.multiplier:g}x is the highest multiple projected within the forgetting budget: "
            f"{best.projected_percent:.2f}%{_interval_text(best)} <= {budget_percent:g}% at the end of the run"
            f"{_cap_text(best)}"
        )
        higher = sorted((r for r in results if r.multiplier > best.multiplier), key=lambda r: r.multiplier)
        if not higher:
            reason += " (the highest multiple probed: a higher rate might fit too)"
        else:
            nxt = higher[0]
            if nxt.usable:
                reason += f"; {nxt.multiplier:g}x is projected at {nxt.projected_percent:.2f}%"
            else:
                reason += f"; {nxt.multiplier:g}x had a non-finite loss"
        return Choice(best.multiplier, best.learning_rate, reason)
    if usable:
        low = usable[0]
        return Choice(
            low.multiplier,
            low.learning_rate,
            f"even the lowest multiple, {low.multiplier:g}x, is projected over the forgetting budget: "
            f"{low.projected_percent:.2f}% > {budget_percent:g}% at the end of the run; training at "
            f"{low.multiplier:g}x (lower learningRate, raise the general share or the budget)",
        )
    low = min(results, key=lambda r: r.multiplier)
    return Choice(
        low.multiplier,
        low.learning_rate,
        f"every probe run had a non-finite loss; training at the lowest multiple, {low.multiplier:g}x (its longer "
        "warmup may keep it finite; lower learningRate)",
    )


# ---- the record ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRecord:
    """What the probe found: written to <checkpoints.output>/forge-lr-probe.json and reported as status.lrProbe."""

    base_learning_rate: float
    budget_percent: float
    steps: int
    results: tuple[MultipleResult, ...]
    choice: Choice

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "baseLearningRate": self.base_learning_rate,
            "budgetPercent": self.budget_percent,
            "steps": self.steps,
            "multiples": [r.to_json() for r in self.results],
            "learningRate": self.choice.learning_rate,
            "multiplier": self.choice.multiplier,
            "reason": self.choice.reason,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> ProbeRecord:
        """Inverse of to_json; raises ValueError on another version or a malformed document."""
        if doc.get("version") != RECORD_VERSION:
            raise ValueError(f"version {doc.get('version')!r}, not {RECORD_VERSION}")
        try:
            return ProbeRecord(
                base_learning_rate=float(doc["baseLearningRate"]),
                budget_percent=float(doc["budgetPercent"]),
                steps=int(doc["steps"]),
                results=tuple(MultipleResult.from_json(r) for r in doc["multiples"]),
                choice=Choice(float(doc["multiplier"]), float(doc["learningRate"]), str(doc["reason"])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed: {type(err).__name__}: {err}") from None

    def status(self) -> dict[str, Any]:
        """status.lrProbe (camelCase; unknown figures left out, never null)."""
        rows = []
        for r in self.results:
            row = {
                "multiplier": r.multiplier,
                "learningRate": _lr(r.learning_rate),
                "projectedForgettingPercent": r4(r.projected_percent),
                "projectedLowPercent": r4(r.projected_low_percent),
                "projectedHighPercent": r4(r.projected_high_percent),
                "extrapolationCapped": r.extrapolation_capped or None,
                "measuredForgettingPercent": r4(r.measured_percent),
            }
            rows.append({k: v for k, v in row.items() if v is not None})
        return {
            "learningRate": _lr(self.choice.learning_rate),
            "multiplier": self.choice.multiplier,
            "reason": self.choice.reason,
            "multiples": rows,
        }


def _lr(value: float) -> float:
    return float(f"{value:.6g}")
