"""What to change when a run forgets more than its budget: a lower learning rate or a larger general share (pure).

The trainer's guard may send its own suggestion (``status.earlyStop.suggestion``, from the slope of forgetting
against the cumulative learning rate it measured); it wins. Otherwise the operator suggests, by rule of thumb:

- learning rate: forgetting grows with the learning rate, so scale it by budget / forgetting, at least halving
  it and at most dividing it by ten, rounded down to two significant digits;
- general share: replaying general data limits forgetting, so double it, or add 25 points when it is small,
  capped at 50% (domainPercent 50). At domainPercent <= 50 only the learning rate is suggested: more replay would
  cost most of the domain signal.

docs/user-guide.md ("When forgetting exceeds the budget") documents both rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from forge_operator.api import Suggestion
from forge_operator.defaults import clamp, format_decimal, parse_decimal

LR_FACTOR_BOUNDS = (0.1, 0.5)
MAX_SUGGESTED_GENERAL_PERCENT = 50
GENERAL_STEP_PERCENT = 25


@dataclass(frozen=True)
class Advice:
    """A suggestion for the next run; either part may be missing."""

    learning_rate: str | None
    domain_percent: int | None

    def sentence(self) -> str:
        """'lower learningRate to 1.1e-5 or raise the general share to 50% (domainPercent 50)'."""
        parts = []
        if self.learning_rate is not None:
            parts.append(f"lower learningRate to {self.learning_rate}")
        if self.domain_percent is not None:
            parts.append(
                f"raise the general share to {100 - self.domain_percent}% (domainPercent {self.domain_percent})"
            )
        return " or ".join(parts)


def _round_down(value: float) -> str:
    """Two significant digits, rounded towards zero: 1.18e-5 -> '1.1e-5' (the suggestion must stay below the cut)."""
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value)) - 1
    mantissa = math.floor(value / 10.0**exponent + 1e-9)
    return format_decimal(mantissa * 10.0**exponent, 2)


def suggest_learning_rate(forgetting: float, budget: float, learning_rate: float) -> str:
    ratio = budget / forgetting if forgetting > 0 else LR_FACTOR_BOUNDS[1]
    return _round_down(learning_rate * clamp(ratio, LR_FACTOR_BOUNDS))


def suggest_domain_percent(domain_percent: int) -> int | None:
    general = 100 - domain_percent
    if general >= MAX_SUGGESTED_GENERAL_PERCENT:
        return None
    raised = min(MAX_SUGGESTED_GENERAL_PERCENT, max(2 * general, general + GENERAL_STEP_PERCENT))
    raised = min(MAX_SUGGESTED_GENERAL_PERCENT, 5 * math.ceil(raised / 5))
    return 100 - raised


def advise(
    forgetting: float,
    budget: float,
    learning_rate: str | None,
    domain_percent: int,
    trainer: Suggestion | None = None,
) -> Advice:
    """The trainer's suggestion where it gives one, the rules of thumb for the rest."""
    rate = trainer.learning_rate if trainer is not None else None
    if rate is None and learning_rate is not None:
        rate = suggest_learning_rate(forgetting, budget, parse_decimal(learning_rate))
    share = trainer.domain_percent if trainer is not None else None
    if share is None:
        share = suggest_domain_percent(domain_percent)
    return Advice(rate, share)
