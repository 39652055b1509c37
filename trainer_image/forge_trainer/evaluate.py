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


def relative_stderr(paired_stderr: float | None, base_loss: float | None) -> float | None:
    """A paired standard error of a loss difference as points of forgetting: relative to the base's loss."""
    if paired_stderr is None or base_loss is None or base_loss <= 0:
        return None
    return 100.0 * paired_stderr / base_loss


def worst_forgetting(
    general: tuple[float | None, float | None], unseen: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    """The (forgetting, stderr) that everything judges: of the two (forgetting, stderr) pairs, replayed general and
    never-replayed (unseen) general, the one that forgot more; its stderr comes with it. A pair whose forgetting is
    None is skipped; (None, None) when neither was measured.

    Replay lowers the loss on its own distribution by construction, so forgetting measured only there reads
    optimistic; the worse of the two is what the budget, the guard and selection compare."""
    worst: tuple[float | None, float | None] = (None, None)
    for percent, stderr in (general, unseen):
        if percent is not None and (worst[0] is None or percent > worst[0]):
            worst = (percent, stderr)
    return worst


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
    """Standard error of the forgetting, in points: of the mean per-sequence rise of the held-out loss over the base
    (paired on the same sequences), relative to the base's loss, on the set forgetting_percent was taken from."""
    unseen_loss: float | None = None
    """Loss on the never-replayed general sets (eval.unseenGeneral), None when there are none."""
    general_forgetting_percent: float | None = None
    """Forgetting on the replayed general held-out set alone, in percent."""
    general_stderr_percent: float | None = None
    """Standard error of general_forgetting_percent, in points."""
    unseen_forgetting_percent: float | None = None
    """Forgetting on the never-replayed general sets, in percent."""
    unseen_stderr_percent: float | None = None
    """Standard error of unseen_forgetting_percent, in points."""

    @staticmethod
    def against(
        step: int,
        domain: float | None,
        general: float | None,
        baseline: EvalResult | None,
        kl_base: float | None = None,
        general_sources: list[float | None] | None = None,
        general_paired_stderr: float | None = None,
        unseen: float | None = None,
        unseen_paired_stderr: float | None = None,
    ) -> EvalResult:
        """Derive forgetting and gain from the baseline (the base model's losses). forgetting_percent is the worse
        of the replayed general and the never-replayed (unseen) forgetting (worst_forgetting)."""
        bd = baseline.domain_loss if baseline else None
        bg = baseline.general_loss if baseline else None
        per_source: list[float | None] | None = None
        base_sources = baseline.general_source_losses if baseline else None
        if general_sources is not None and base_sources is not None and len(base_sources) == len(general_sources):
            per_source = [forgetting_percent(b, g) for b, g in zip(base_sources, general_sources, strict=True)]
        bu = baseline.unseen_loss if baseline else None
        general_pair = (forgetting_percent(bg, general), relative_stderr(general_paired_stderr, bg))
        unseen_pair = (forgetting_percent(bu, unseen), relative_stderr(unseen_paired_stderr, bu))
        worst, worst_stderr = worst_forgetting(general_pair, unseen_pair)
        return EvalResult(
            step=step,
            domain_loss=domain,
            general_loss=general,
            forgetting_percent=worst,
            domain_gain_percent=domain_gain_percent(bd, domain),
            kl_base=kl_base,
            general_source_losses=general_sources,
            general_source_forgetting=per_source,
            forgetting_stderr_percent=worst_stderr,
            unseen_loss=unseen,
            general_forgetting_percent=general_pair[0],
            general_stderr_percent=general_pair[1],
            unseen_forgetting_percent=unseen_pair[0],
            unseen_stderr_percent=unseen_pair[1],
        )
