"""What the loop learns at each read-back: the steps' figures (metrics, step events, the guard's step rules), this
rank's pace among its peers, throughput and MFU; and the progress it reports to the status."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from forge_trainer.config import GENERAL_GROUP
from forge_trainer.context import RankContext
from forge_trainer.data_stream import DataStream
from forge_trainer.events import emit
from forge_trainer.guard import Guard, Verdict
from forge_trainer.metrics import device_peak_flops, flops_per_token
from forge_trainer.model import count_params, full_numel
from forge_trainer.pace import (
    FAULT_ENV,
    OwnTime,
    PaceSettings,
    PaceWatch,
    Peer,
    StepClock,
    local_peer,
    pace_status,
    parse_fault,
)
from forge_trainer.report import latest_status, progress_status, rfc3339

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepFigures:
    """One optimizer step's training figures, left on the device until the next read-back."""

    step: int
    loss: torch.Tensor  # this rank's part of the step's token-mean loss (the sum over ranks is the loss)
    lr: float
    grad_norm: torch.Tensor | float | None  # global norm before clipping; None when the engine computes none


def device_grad_norm(engine: Any) -> torch.Tensor | float | None:
    """The engine's global gradient norm of the step just taken, without reading it back to the host."""
    norm = engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        return norm.detach().reshape(()).clone()  # a snapshot: the engine may reuse its tensor
    return None if norm is None else float(norm)


@dataclass
class Throughput:
    """Training tokens per second over windows of steps (evaluation, checkpoints and the compile phase excluded)."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    restarted: bool = True
    """The window began at the start or a restart: its figure is not judged for throughput drops (pace.py)."""

    def update(self, step_tokens: int) -> float | None:
        """Close a window of ``steps`` steps of ``step_tokens`` global tokens each: tokens/s (None: no step)."""
        now = time.perf_counter()
        elapsed = max(1e-9, now - self.started)
        steps, self.started, self.steps, self.restarted = self.steps, now, 0, False
        return step_tokens * steps / elapsed if steps else None

    def restart(self) -> None:
        """Start a new window now (evaluation and checkpoints are not training time)."""
        self.started = time.perf_counter()
        self.steps = 0
        self.restarted = True


class StepObserver:
    """Reads back the pending steps' figures and exports, logs and judges them (every rank)."""

    def __init__(self, ctx: RankContext, guard: Guard, stream: DataStream) -> None:
        self.ctx = ctx
        self.guard = guard
        self.stream = stream
        denv = ctx.denv
        self.flops_token = 0.0
        self.peak = device_peak_flops()
        self.tps: float | None = None
        self.clock = StepClock()
        pace = ctx.cfg.pace
        self.pace = PaceWatch(
            PaceSettings(pace.straggler_percent, pace.read_backs, pace.drop_percent), denv.rank, denv.world_size
        )
        self.own = OwnTime(parse_fault(os.environ.get(FAULT_ENV), denv.rank))
        self.peers: list[Peer] | None = None

    def set_flops(self, model: torch.nn.Module) -> None:
        """Training FLOPs per token of ``model`` (for MFU); logs its size."""
        total, trainable = count_params(model)
        mcfg: Any = getattr(model, "config", None)
        layers = int(getattr(mcfg, "num_hidden_layers", 0) or 0)
        hidden = int(getattr(mcfg, "hidden_size", 0) or 0)
        get_emb: Any = getattr(model, "get_input_embeddings", None)
        emb: Any = get_emb() if get_emb is not None else None
        tied = bool(getattr(mcfg, "tie_word_embeddings", False))
        emb_params = full_numel(emb.weight) if emb is not None and not tied else 0
        self.flops_token = flops_per_token(total - emb_params, layers, hidden, self.ctx.cfg.data.seq_length)
        if self.ctx.denv.is_main:
            log.info("model: %d parameters, %d trainable", total, trainable)

    def compile_phase(self, seconds: float) -> None:
        """The first step with training.compile traces and compiles the model: a phase of its own, reported as the
        ``compile`` event and metric, not counted in tokens per second. One device sync, once per process."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        m = self.ctx.metrics
        m.set(m.compile_seconds, seconds)
        if self.ctx.denv.is_main:
            emit("compile", step=self.ctx.progress.step + 1, seconds=round(seconds, 3))
            log.info("compile phase: the first step took %.1f s (not counted in tokens per second)", seconds)

    def flush(self, pending: list[StepFigures], window: Throughput) -> Verdict | None:
        """Read back the pending steps' figures (one all-reduce, one device sync); export, log and guard each step.

        The all-reduce also carries each rank's pace (its median own step time, at its place among zeros)."""
        ctx = self.ctx
        n, world = len(pending), ctx.denv.world_size
        pace = torch.tensor(self.pace.slots(self.clock.median_own()), dtype=torch.float32)
        losses = torch.cat([torch.stack([p.loss for p in pending]), pace.to(pending[0].loss.device)])
        if world > 1:
            dist.all_reduce(losses)  # each rank holds its part of every step's token mean
        on_device = [i for i, p in enumerate(pending) if isinstance(p.grad_norm, torch.Tensor)]
        if on_device:
            norms_t = torch.stack([pending[i].grad_norm for i in on_device])  # type: ignore[misc]
            losses = torch.cat([losses, norms_t.to(losses)])
        values: list[float] = losses.tolist()
        norms = [None if isinstance(p.grad_norm, torch.Tensor) else p.grad_norm for p in pending]
        for j, i in enumerate(on_device):
            norms[i] = values[n + world + j]
        settled = not window.restarted
        rate = window.update(ctx.step_tokens)
        self.tps = rate or self.tps
        self._export(n, values[n - 1], pending[-1].lr, norms[-1])
        self._observe_pace(values[n : n + world], rate, settled)
        verdict: Verdict | None = None
        for p, loss, norm in zip(pending, values[:n], norms, strict=True):
            if ctx.denv.is_main:
                extra = {} if norm is None else {"gradNorm": norm}
                tps = None if self.tps is None else round(self.tps, 1)  # None: only the compile step so far
                emit("step", step=p.step, loss=loss, lr=p.lr, tokensPerSecond=tps, **extra)
            found = self.guard.observe_step(p.step, loss, p.lr, norm)
            verdict = verdict or found
        return verdict

    def _export(self, steps: int, loss: float, lr: float, grad_norm: float | None) -> None:
        """The training metrics after ``steps`` more steps, the last with ``loss``, ``lr`` and ``grad_norm``."""
        ctx, m = self.ctx, self.ctx.metrics
        m.set(m.step, ctx.progress.step)
        m.inc(m.tokens, ctx.step_tokens * steps / ctx.denv.world_size)
        if self.tps is not None:
            m.set(m.tokens_per_second, self.tps / ctx.denv.world_size)
        m.set(m.loss, loss)
        m.set(m.learning_rate, lr)
        if grad_norm is not None:
            m.set(m.grad_norm, grad_norm)
        mfu = self.mfu()
        if mfu is not None:
            m.set(m.mfu, mfu)
        mix = self.stream.mix_report()
        for row in mix["sources"] if mix else []:
            m.set(m.data_tokens, row["tokens"], group=row["group"], source=row["uri"])

    def _observe_pace(self, times: list[float], rate: float | None, settled: bool) -> None:
        """Every rank: export its pace and judge the gathered figures; rank 0 reports what changed (pace.py)."""
        ctx, m = self.ctx, self.ctx.metrics
        own, wait = self.clock.median_own(), self.clock.data_wait_ratio()
        if own is not None:
            m.set(m.rank_step_seconds, own)
        if wait is not None:
            m.set(m.data_wait, wait)
        if self.peers is None:  # once per process, at the first read-back (every rank is there)
            mine: list[Any] = [local_peer()]
            if ctx.denv.world_size > 1:
                mine = [None] * ctx.denv.world_size
                dist.all_gather_object(mine, local_peer())
            self.peers = mine
        before, reported = self.pace.findings, self.pace.reported
        found = self.pace.observe(times, rate, settled)
        named = found.straggler.rank if found.straggler is not None else None
        m.set(m.straggler, 1 if named == ctx.denv.rank else 0)
        if not ctx.denv.is_main or (reported and before.key == found.key):
            return
        self.pace.reported = True
        doc = pace_status(found, ctx.denv.world_size, self.peers, ctx.progress.step, rfc3339())
        emit("pace", **doc)
        for finding in (found.straggler, found.drop):
            if finding is not None:
                log.warning("%s: %s", finding.reason, finding.message)
        ctx.report(pace=doc)

    def mfu(self) -> float | None:
        """Model FLOPs utilisation of this rank's device, or None on CPU."""
        if self.peak is None or self.tps is None:
            return None
        return self.tps / self.ctx.denv.world_size * self.flops_token / self.peak

    def report_progress(self) -> None:
        """Rank 0: status.progress and status.latest as of now (the reporter throttles and merges them)."""
        ctx = self.ctx
        if ctx.reporter is None:
            return
        t = ctx.cfg.training
        eta = None
        if self.tps:
            remaining_tokens = (t.max_steps - ctx.progress.step) * ctx.step_tokens
            eta = remaining_tokens / self.tps
        lr = float(ctx.engine.lr_scheduler.get_last_lr()[0])
        mix = self.stream.mix_report()
        step_s, wait = self.clock.median_step(), self.clock.data_wait_ratio()
        interval = ctx.cfg.report.min_interval_seconds
        ctx.report(
            progress=progress_status(
                ctx.progress.step,
                t.max_steps,
                ctx.progress.tokens,
                eta,
                step_seconds=step_s,
                report_interval_seconds=None if step_s is None else max(interval, t.log_every_steps * step_s),
                data_wait_percent=None if wait is None else 100 * wait,
            ),
            latest=latest_status(
                ctx.latest_eval,
                self.tps,
                self.mfu(),
                lr,
                mix["realisedDomainPercent"] if mix else None,
                [s.uri for s in ctx.cfg.eval_group(GENERAL_GROUP)[0]],
                mix["realisedDomainGradientPercent"] if mix else None,
            ),
        )
