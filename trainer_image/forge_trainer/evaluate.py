"""Forgetting and domain-gain figures from held-out losses (pure; the guard of issue 5 builds on them)."""

from __future__ import annotations

from dataclasses import dataclass


def forgetting_percent(base_general: float | None, general: float | None) -> float | None:
    """Relative rise of the general held-out loss over the base model, in percent (negative: it improved)."""
    if base_general is None or general is None or base_general <= 0:
        return None
    return 100.0 * (general - base_general) / base_general


def domain_gain_percent(base_domain: float | None, domain: float | None) -> float | None:
    """Relative fall of the domain held-out loss under the base model, in percent (positive: it learned)."""
    if base_domain is None or domain is None or base_domain <= 0:
        return None
    return 100.0 * (base_domain - domain) / base_domain


@dataclass(frozen=True)
class EvalResult:
    """Held-out losses at one step and the figures derived against the baseline."""

    step: int
    domain_loss: float | None
    general_loss: float | None
    forgetting_percent: float | None
    domain_gain_percent: float | None

    @staticmethod
    def against(step: int, domain: float | None, general: float | None, baseline: EvalResult | None) -> EvalResult:
        """Derive forgetting and gain from the baseline (the base model's losses)."""
        bd = baseline.domain_loss if baseline else None
        bg = baseline.general_loss if baseline else None
        return EvalResult(step, domain, general, forgetting_percent(bg, general), domain_gain_percent(bd, domain))
