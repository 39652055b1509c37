"""One rank's training stream: the mix plan, the mixer, the prefetch thread, and the data state trained on so far."""

from __future__ import annotations

from typing import Any

from forge_trainer.config import DataSettings
from forge_trainer.context import RankContext
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import (
    MixPlan,
    Prefetcher,
    StepBatch,
    build_mixer,
    data_state,
    plan_mix,
    plan_report,
    step_batches,
)
from forge_trainer.data.mixer import Mixer, MixReport


class DataStream:
    """The batches this rank trains on, from a plan (data.domainPercent, or the share after a rebalance)."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.encoder: DocEncoder | None = None
        self.plan: MixPlan | None = None
        self.mixer: Mixer | None = None
        self.prefetch: Prefetcher | None = None
        self.trained_state: dict[str, Any] | None = None
        """The data state after the last step trained (the prefetcher runs ahead of training)."""

    def data_at(self, domain_percent: int) -> DataSettings:
        """The data settings with another domain share."""
        return self.ctx.cfg.data.model_copy(update={"domain_percent": domain_percent})

    def build_mixer(self, state: dict[str, Any] | None) -> None:
        """The mixer of the plan, at ``state`` (None: the stream's start)."""
        assert self.plan is not None and self.encoder is not None
        self.mixer = build_mixer(self.plan, self.ctx.cfg, self.encoder, state)

    def start(self, step: int) -> None:
        """Start prefetching the batches of the steps after ``step``."""
        assert self.mixer is not None and self.plan is not None
        self.prefetch = Prefetcher(step_batches(self.mixer, self.plan, self.ctx.cfg, self.ctx.layout, step))

    def next(self) -> StepBatch:
        """The next step's batch (waits for the prefetch thread)."""
        assert self.prefetch is not None
        return self.prefetch.next()

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self.prefetch is not None:
            self.prefetch.close()

    def rebalance(self, domain_percent: int, step: int) -> None:
        """A new plan and mixer at ``domain_percent`` from the data state trained on so far, for the steps after
        ``step``."""
        cfg = self.ctx.cfg
        assert self.prefetch is not None and self.encoder is not None
        assert self.trained_state is not None and self.plan is not None
        self.prefetch.close()
        plan = plan_mix(self.data_at(domain_percent), self.plan.shards, cfg.hold_out())
        state = dict(self.trained_state)
        old_sources = list(state["sources"])
        state["sources"] = old_sources + [None] * (len(plan.sources) - len(old_sources))
        state["current"] = [0] * len(plan.sources)
        state["fingerprint"] = plan.fingerprint(cfg.training.seed, cfg.data.seq_length)
        self.plan = plan
        self.mixer = build_mixer(plan, cfg, self.encoder, state)
        # the stream's state now (before the prefetch thread advances the mixer), in the new plan's shape
        self.trained_state = data_state(self.mixer, plan, cfg)
        self.prefetch = Prefetcher(step_batches(self.mixer, plan, cfg, self.ctx.layout, step))

    def mix_report(self) -> MixReport | None:
        """The realised mix of the data trained on so far (the prefetcher runs ahead of training)."""
        if self.trained_state is None or self.plan is None:
            return None
        return plan_report(self.plan, self.trained_state)
