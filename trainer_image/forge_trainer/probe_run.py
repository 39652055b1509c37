"""The learning-rate probe on the ranks (training.probe): short runs at every multiple from the base weights, or the
choice of an earlier probe of the same output; the run then trains at the chosen rate. The maths is in probe.py."""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from forge_trainer import checkpoint as ckpt
from forge_trainer import probe, storage
from forge_trainer.config import DOMAIN_GROUP, GENERAL_GROUP, UNSEEN_GROUP, TrainerConfig
from forge_trainer.context import RankContext
from forge_trainer.data.loader import Prefetcher, build_mixer, step_batches
from forge_trainer.data_stream import DataStream
from forge_trainer.engine import build_engine, build_model, seed_everything, train_step
from forge_trainer.evaluate import EvalResult
from forge_trainer.evaluation import EvalSets, eval_set, measure_heldout
from forge_trainer.events import emit
from forge_trainer.guard import Guard
from forge_trainer.model import pad_token_id

log = logging.getLogger(__name__)


class LearningRateProbe:
    """Settles this run's learning rate before training (every rank takes part)."""

    def __init__(self, ctx: RankContext, guard: Guard, stream: DataStream) -> None:
        self.ctx = ctx
        self.guard = guard
        self.stream = stream

    @property
    def uri(self) -> str:
        """Where the probe's record lives: next to the checkpoints, for every restart of this run."""
        return storage.join(self.ctx.cfg.checkpoints.output, probe.PROBE_FILE)

    def settle(self, resumed: bool) -> None:
        """training.probe: the learning rate of this run, from this output's earlier probe or from a new one.

        A restart never probes again: it takes the multiple saved with the checkpoint it resumes, else the one in
        <output>/forge-lr-probe.json; a run that resumes without either trains at the configured rate.
        """
        ctx = self.ctx
        cfg, denv = ctx.cfg, ctx.denv
        record = self._read_record()
        multiplier, source = None, ""
        if resumed and ctx.progress.lr_multiplier is not None:
            multiplier, source = ctx.progress.lr_multiplier, "checkpoint"
        elif record is not None:
            multiplier, source = record.choice.multiplier, "record"
        if multiplier is not None:
            if denv.is_main:
                lr = cfg.training.learning_rate * multiplier
                emit("probeReused", multiplier=multiplier, learningRate=lr, source=source, uri=self.uri)
        elif resumed:
            log.warning("resuming without a learning-rate probe record: training at the configured learning rate")
            multiplier = 1.0
        else:
            record = self._probe()
            multiplier = ctx.broadcast(record.choice.multiplier)
            if denv.is_main:
                storage.write_bytes(self.uri, json.dumps(record.to_json(), indent=1).encode())
            seed_everything(cfg.training.seed, denv.rank)  # the run starts from the same RNG state as without it
        self._use_multiplier(multiplier)
        if record is not None:
            ctx.report(lrProbe=record.status())

    def _read_record(self) -> probe.ProbeRecord | None:
        """The record of an earlier probe, read by rank 0 for every rank (None: none, or unusable)."""

        def read() -> dict[str, Any] | None:
            doc = ckpt.read_json_object(self.uri, probe.PROBE_FILE)
            if doc is not None:
                try:
                    probe.ProbeRecord.from_json(doc)
                except ValueError as err:
                    log.warning("ignoring %s: %s", self.uri, err)
                    return None
            return doc

        doc = self.ctx.on_main("reading the learning-rate probe's record", read)
        return None if doc is None else probe.ProbeRecord.from_json(doc)

    def _use_multiplier(self, multiplier: float) -> None:
        """Train at ``multiplier`` x the configured peak (and floor) learning rate; the guard follows."""
        ctx = self.ctx
        training = probe.scaled_training(ctx.cfg.training, multiplier)
        ctx.cfg = ctx.cfg.model_copy(update={"training": training})
        self.guard.learning_rate = training.learning_rate
        ctx.progress.lr_multiplier = multiplier
        if ctx.denv.is_main:
            log.info("learning rate %.6g (%gx the configured rate)", training.learning_rate, multiplier)

    def _probe(self) -> probe.ProbeRecord:
        """Short runs at every multiple, ascending, from the base weights (every rank takes part); the choice."""
        ctx, encoder = self.ctx, self.stream.encoder
        cfg, denv = ctx.cfg, ctx.denv
        settings = cfg.training.probe
        assert settings is not None and encoder is not None
        pad = pad_token_id(ctx.tokenizer)
        max_tokens = min(settings.eval_max_tokens, cfg.eval.max_tokens)
        sets = (
            eval_set(cfg, DOMAIN_GROUP, max_tokens, encoder, pad),
            eval_set(cfg, GENERAL_GROUP, max_tokens, encoder, pad),
            eval_set(cfg, UNSEEN_GROUP, max_tokens, encoder, pad),
        )
        baseline: EvalResult | None = None
        results: list[probe.MultipleResult] = []
        for multiplier in sorted(settings.multipliers):
            run_cfg = cfg.model_copy(update={"training": probe.probe_training(cfg.training, multiplier)})
            started = time.perf_counter()
            seed_everything(cfg.training.seed, denv.rank)  # every multiple starts from the same state
            model = build_model(ctx.model_dir, run_cfg, denv.world_size)
            engine = build_engine(model, run_cfg, denv.world_size)
            try:
                if baseline is None:
                    baseline, _, _ = measure_heldout(engine.module, engine.device, sets, cfg, denv, 0, None)
                    assert baseline is not None
                points, finite = self._run(engine, run_cfg, sets, baseline)
            finally:
                engine.destroy()
                del engine, model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            result = probe.assess(multiplier, cfg.training, points, finite, time.perf_counter() - started)
            results.append(result)
            if denv.is_main:
                emit("probe", **result.to_json())
        choice = probe.choose(results, cfg.forgetting.budget_percent)
        record = probe.ProbeRecord(
            cfg.training.learning_rate, cfg.forgetting.budget_percent, settings.steps, tuple(results), choice
        )
        if denv.is_main:
            emit("probeResult", learningRate=choice.learning_rate, multiplier=choice.multiplier, reason=choice.reason)
            log.info("learning-rate probe: %s", choice.reason)
        return record

    def _run(
        self, engine: Any, run_cfg: TrainerConfig, sets: EvalSets, baseline: EvalResult
    ) -> tuple[list[probe.ProbePoint], bool]:
        """One probe run on the real stream from its start: (its evaluations, whether every figure was finite)."""
        ctx, plan, encoder = self.ctx, self.stream.plan, self.stream.encoder
        settings = ctx.cfg.training.probe
        assert settings is not None and plan is not None and encoder is not None
        t, world = run_cfg.training, ctx.denv.world_size
        due = set(probe.eval_steps(t.max_steps, settings.evaluations))
        mixer = build_mixer(plan, run_cfg, encoder)
        prefetch = Prefetcher(step_batches(mixer, plan, run_cfg, ctx.layout, 0))
        points: list[probe.ProbePoint] = []
        pending: list[torch.Tensor] = []
        try:
            for step in range(1, t.max_steps + 1):
                batch = prefetch.next()
                pending.append(train_step(engine, batch.micro, batch.global_loss_tokens, world, t.loss_chunk_tokens))
                if step not in due:
                    continue
                losses = torch.stack(pending)
                pending = []
                if world > 1:
                    dist.all_reduce(losses)
                if not bool(torch.isfinite(losses).all()):
                    return points, False
                ev, _, _ = measure_heldout(engine.module, engine.device, sets, run_cfg, ctx.denv, step, baseline)
                forgetting = ev.forgetting_percent if ev is not None else None
                if forgetting is None or not math.isfinite(forgetting):
                    return points, False
                assert ev is not None
                points.append(probe.ProbePoint(step, probe.cumulative_lr(t, step), forgetting, ev.domain_gain_percent))
        finally:
            prefetch.close()
        return points, True
