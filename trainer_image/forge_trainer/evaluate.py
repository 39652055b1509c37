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
    kl_base: float | None = None
    """KL(base || model) per general token in nats (a top-k lower bound), None when not measured."""
    general_source_losses: list[float | None] | None = None
    """General held-out loss per source, in the order of eval.general."""
    general_source_forgetting: list[float | None] | None = None
    """Forgetting per general source, in percent, against the base model's loss on that source."""
    forgetting_stderr_percent: float | None = None
    """Standard error of the forgetting, in points: of the mean per-sequence rise of the general loss over the base
    (paired on the same sequences), relative to the base's general loss."""

    @staticmethod
    def against(
        step: int,
        domain: float | None,
        general: float | None,
        baseline: EvalResult | None,
        kl_base: float | None = None,
        general_sources: list[float | None] | None = None,
        general_paired_stderr: float | None = None,
    ) -> EvalResult:
        """Derive forgetting and gain from the baseline (the base model's losses)."""
        bd = baseline.domain_loss if baseline else None
        bg = baseline.general_loss if baseline else None
        per_source: list[float | None] | None = None
        base_sources = baseline.general_source_losses if baseline else None
        if general_sources is not None and base_sources is not None and len(base_sources) == len(general_sources):
            per_source = [forgetting_percent(b, g) for b, g in zip(base_sources, general_sources, strict=True)]
        stderr = None
        if general_paired_stderr is not None and bg is not None and bg > 0:
            stderr = 100.0 * general_paired_stderr / bg
        return EvalResult(
            step,
            domain,
            general,
            forgetting_percent(bg, general),
            domain_gain_percent(bd, domain),
            kl_base,
            general_sources,
            per_source,
            stderr,
        )
