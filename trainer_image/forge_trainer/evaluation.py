"""Held-out evaluation of one rank's run: the base model's pass (baseline, KL cache, per-sequence base losses), the
evaluations during training, and their metrics and events."""

from __future__ import annotations

from typing import Any

from forge_trainer.config import DOMAIN_GROUP, GENERAL_GROUP, UNSEEN_GROUP, EvalGroup, TrainerConfig
from forge_trainer.context import RankContext
from forge_trainer.data.encode import DocEncoder
from forge_trainer.engine import DistEnv
from forge_trainer.evaluate import EvalResult
from forge_trainer.events import emit
from forge_trainer.heldout import EvalSeq, KLCache, SequenceLosses, eval_sequences, evaluate_set
from forge_trainer.report import baseline_status

EvalSet = list[EvalSeq]
# The (domain, general, unseen general) held-out sets.
EvalSets = tuple[EvalSet, EvalSet, EvalSet]
# This rank's per-sequence losses of the base model on the (general, unseen general) sets.
BaseLosses = tuple[SequenceLosses | None, SequenceLosses | None]


class Evaluator:
    """The run's held-out sets and what the base model's pass leaves for later evaluations (every rank)."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.domain: EvalSet = []
        self.general: EvalSet = []
        self.unseen: EvalSet = []
        self.kl_cache: KLCache | None = None
        self.base_losses: BaseLosses | None = None

    @property
    def sets(self) -> EvalSets:
        """The (domain, general, unseen general) sets."""
        return self.domain, self.general, self.unseen

    @property
    def has_sets(self) -> bool:
        """False when every held-out set is empty (nothing to evaluate)."""
        return bool(self.domain or self.general or self.unseen)

    def load_sets(self, encoder: DocEncoder, pad: int) -> None:
        """Read and encode the held-out sets (eval.maxTokens each)."""
        cfg = self.ctx.cfg
        self.domain = eval_set(cfg, DOMAIN_GROUP, cfg.eval.max_tokens, encoder, pad)
        self.general = eval_set(cfg, GENERAL_GROUP, cfg.eval.max_tokens, encoder, pad)
        self.unseen = eval_set(cfg, UNSEEN_GROUP, cfg.eval.max_tokens, encoder, pad)

    def measure_base(self, resumed: bool) -> None:
        """The base model's pass (before any checkpoint is loaded): the baseline on a first start, and on every start
        this rank's KL cache and per-sequence general losses (kept in memory, not in checkpoints: rebuilding them
        costs one evaluation)."""
        ctx = self.ctx
        need_base = bool(self.general or self.unseen)
        if resumed and (not need_base or ctx.progress.baseline is None):
            return
        ev = self.measure(0, build_cache=need_base)
        if resumed or ev is None:
            return
        ctx.progress.baseline = ev
        ctx.latest_eval = ev
        self.record(ev)
        if ctx.denv.is_main:
            ctx.report(baseline=baseline_status(ev))

    def measure(self, step: int, build_cache: bool = False, module: Any = None) -> EvalResult | None:
        """Held-out figures of the model being trained, or of ``module`` (every rank takes part)."""
        if not self.has_sets:
            return None
        ctx = self.ctx
        ev, cache, sequences = measure_heldout(
            ctx.engine.module if module is None else module,
            ctx.engine.device,
            self.sets,
            ctx.cfg,
            ctx.denv,
            step,
            ctx.progress.baseline if step else None,
            kl_cache=None if build_cache else self.kl_cache,
            build_top_k=ctx.cfg.eval.kl_top_k if build_cache else 0,
            base_losses=None if build_cache else self.base_losses,
        )
        if build_cache:
            self.kl_cache = cache if ctx.cfg.eval.kl_top_k > 0 else None
            self.base_losses = sequences
        return ev

    def record(self, ev: EvalResult) -> None:
        """Export one evaluation (every rank) and log it (rank 0)."""
        m = self.ctx.metrics
        if ev.domain_loss is not None:
            m.set(m.eval_loss, ev.domain_loss, set="domain")
        if ev.general_loss is not None:
            m.set(m.eval_loss, ev.general_loss, set="general")
        if ev.unseen_loss is not None:
            m.set(m.eval_loss, ev.unseen_loss, set="unseen")
        if ev.forgetting_percent is not None:
            m.set(m.forgetting, ev.forgetting_percent)
        if ev.domain_gain_percent is not None:
            m.set(m.domain_gain, ev.domain_gain_percent)
        if ev.kl_base is not None:
            m.set(m.kl_base, ev.kl_base)
        uris = [s.uri for s in self.ctx.cfg.eval_group(GENERAL_GROUP)[0]]
        for uri, loss in zip(uris, ev.general_source_losses or [], strict=False):
            if loss is not None:
                m.set(m.general_source_loss, loss, source=uri)
        for uri, forgetting in zip(uris, ev.general_source_forgetting or [], strict=False):
            if forgetting is not None:
                m.set(m.general_source_forgetting, forgetting, source=uri)
        if self.ctx.denv.is_main:
            emit("eval", **ev.__dict__)

    def evaluate(self, step: int) -> EvalResult | None:
        """Measure the model being trained at ``step``, export and log the figures (every rank takes part)."""
        ev = self.measure(step)
        if ev is not None:
            self.record(ev)
        return ev


def measure_heldout(
    module: Any,
    device: Any,
    sets: EvalSets,
    cfg: TrainerConfig,
    denv: DistEnv,
    step: int,
    baseline: EvalResult | None,
    kl_cache: KLCache | None = None,
    build_top_k: int = 0,
    base_losses: BaseLosses | None = None,
) -> tuple[EvalResult | None, KLCache | None, BaseLosses | None]:
    """Held-out figures of ``module`` on the (domain, general, unseen general) sets against ``baseline`` (every rank
    takes part), the KL cache built when ``build_top_k`` > 0, and this rank's per-sequence (general, unseen) losses
    (the base pass keeps them: with ``base_losses`` both forgetting figures get a paired standard error). None when
    every set is empty."""
    domain_set, general_set, unseen_set = sets
    if not domain_set and not general_set and not unseen_set:
        return None, None, None
    base_general, base_unseen = base_losses if base_losses is not None else (None, None)
    mb, rank, world = cfg.training.micro_batch_size, denv.rank, denv.world_size
    domain, _ = evaluate_set(module, device, domain_set, len(cfg.eval_group(DOMAIN_GROUP)[0]), mb, rank, world)
    general, cache = evaluate_set(
        module,
        device,
        general_set,
        len(cfg.eval_group(GENERAL_GROUP)[0]),
        mb,
        rank,
        world,
        kl_cache=kl_cache,
        build_top_k=build_top_k,
        base_losses=base_general,
    )
    unseen, _ = evaluate_set(
        module, device, unseen_set, len(cfg.eval_group(UNSEEN_GROUP)[0]), mb, rank, world, base_losses=base_unseen
    )
    sources = general.per_source if general.mean is not None else None
    ev = EvalResult.against(
        step,
        domain.mean,
        general.mean,
        baseline,
        general.kl,
        sources,
        general.paired_stderr,
        unseen.mean,
        unseen.paired_stderr,
    )
    return ev, cache, (general.sequences, unseen.sequences)


def eval_set(cfg: TrainerConfig, group: EvalGroup, max_tokens: int, encoder: DocEncoder, pad: int) -> EvalSet:
    """A held-out group's fixed set: its eval sources, or its training sources' held-out documents."""
    sources, per_mille = cfg.eval_group(group)
    return eval_sequences(sources, max_tokens, cfg, encoder, pad, hold_out_per_mille=per_mille)
