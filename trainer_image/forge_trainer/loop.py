"""One training run on one rank: set up, resume, train, evaluate, checkpoint, report.

The step loop is here; its parts are in their own modules: the shared context (context.py), the data stream
(data_stream.py), evaluation (evaluation.py), checkpoints (checkpoint_manager.py), the learning-rate probe
(probe_run.py), the read-back figures and status progress (observers.py), the guard's actions (guard_actions.py) and
the end-of-run candidates (candidate_builder.py).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from forge_trainer import checkpoint as ckpt
from forge_trainer import storage
from forge_trainer.candidate_builder import CandidateBuilder
from forge_trainer.checkpoint_manager import STOP_MARKER, CheckpointManager, Resumed, read_stop_marker
from forge_trainer.config import TrainerConfig
from forge_trainer.context import RankContext
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import Layout, plan_mix, preflight, prepare_phase
from forge_trainer.data_stream import DataStream
from forge_trainer.engine import (
    DistEnv,
    build_engine,
    build_model,
    dist_env,
    init_distributed,
    lr_factor,
    seed_everything,
    train_step,
)
from forge_trainer.errors import EXIT_HANG, HangError, PeerLostError
from forge_trainer.evaluation import Evaluator
from forge_trainer.events import emit
from forge_trainer.guard import NON_FINITE, Guard, Verdict
from forge_trainer.guard_actions import GuardActions
from forge_trainer.metrics import create_metrics, metrics_port, serve
from forge_trainer.model import fetch_model, load_tokenizer, pad_token_id
from forge_trainer.observers import StepFigures, StepObserver, Throughput, device_grad_norm
from forge_trainer.phases import RankZeroPhases
from forge_trainer.probe_run import LearningRateProbe
from forge_trainer.report import StatusReporter, kube_patcher, report_exit_error
from forge_trainer.watchdog import HangWatchdog, WatchdogSettings

log = logging.getLogger(__name__)


class Run:
    """Everything one rank needs for a run."""

    def __init__(self, cfg: TrainerConfig, denv: DistEnv) -> None:
        layout = Layout(
            denv.world_size, denv.rank, cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps
        )
        places = ckpt.Places(Path(cfg.checkpoints.local_dir), cfg.checkpoints.output)
        self.ctx = ctx = RankContext(cfg, denv, places, layout, create_metrics(cfg.job_name, cfg.namespace, denv.rank))
        self.guard = Guard(cfg.forgetting, cfg.training.max_steps, cfg.training.learning_rate, cfg.data.domain_percent)
        self.guard.can_rebalance = bool(cfg.data.general)
        self.guard.lr_of = lambda i: ctx.cfg.training.learning_rate * lr_factor(ctx.cfg.training, i)
        self.stream = DataStream(ctx)
        self.evaluator = Evaluator(ctx)
        self.observer = StepObserver(ctx, self.guard, self.stream)
        self.checkpoints = CheckpointManager(ctx, self.guard, self.stream)
        self.candidates = CandidateBuilder(ctx, self.evaluator)
        self.actions = GuardActions(ctx, self.guard, self.stream, self.checkpoints, self.candidates)

    # ---- setup -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the job, load model and data, resume if a complete checkpoint exists."""
        ctx = self.ctx
        self._join()
        encoder = self._plan_data()
        resumed = self.checkpoints.find_resume()
        if resumed is not None:
            self._restore(resumed)
        else:
            assert self.stream.plan is not None
            preflight(self.stream.plan, ctx.cfg, encoder, ctx.cfg.training.max_steps * ctx.layout.step_sequences)
        self.evaluator.load_sets(encoder, pad_token_id(ctx.tokenizer))
        if ctx.cfg.training.probe is not None:
            LearningRateProbe(ctx, self.guard, self.stream).settle(resumed=resumed is not None)
        cfg, world = ctx.cfg, ctx.denv.world_size
        model = build_model(ctx.model_dir, cfg, world)
        self.observer.set_flops(model)
        ctx.engine = build_engine(model, cfg, world)
        self.evaluator.measure_base(resumed=resumed is not None)
        if resumed is not None:
            self.checkpoints.load(resumed)
        self._warn_missing_sets()
        self.stream.build_mixer(resumed.data_state if resumed is not None else None)

    def _join(self) -> None:
        """Join the process group; serve metrics; rank 0 of a reporting job starts its status reporter."""
        ctx, cfg, denv = self.ctx, self.ctx.cfg, self.ctx.denv
        cfg.check_world(denv.world_size)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        init_distributed(denv, int(os.environ.get("FORGE_DIST_TIMEOUT_S", "1800")))
        ctx.phases = RankZeroPhases(denv.rank, denv.world_size)
        seed_everything(cfg.training.seed, denv.rank)
        serve(ctx.metrics, metrics_port(cfg.report.metrics_port, denv.local_rank))
        ctx.metrics.set(ctx.metrics.total_steps, cfg.training.max_steps)
        ctx.metrics.set(ctx.metrics.forgetting_budget, cfg.forgetting.budget_percent)
        if denv.is_main and cfg.report.forge_job is not None:
            ref = cfg.report.forge_job
            ctx.reporter = StatusReporter(lambda: kube_patcher(ref), cfg.report.min_interval_seconds)
            ctx.report_phase("setup")

    def _plan_data(self) -> DocEncoder:
        """Fetch the base model and its tokenizer, plan the mix (and prepare its token shards); the encoder."""
        ctx, cfg, denv, stream = self.ctx, self.ctx.cfg, self.ctx.denv, self.stream
        ctx.model_dir = fetch_model(cfg.model.base, ctx.places.local_dir / "base-model")
        ctx.tokenizer = load_tokenizer(ctx.model_dir)
        encoder = DocEncoder(ctx.tokenizer, assistant_only=cfg.model.technique in ("sft", "lora"))
        stream.encoder = encoder
        stream.plan = plan_mix(cfg.data, hold_out=cfg.hold_out())
        if cfg.data.cache_tokens:
            stream.plan, prepared, seconds = prepare_phase(stream.plan, cfg, encoder, denv.rank, denv.world_size)
            ctx.metrics.set(ctx.metrics.prepare_seconds, seconds)
            if denv.is_main:
                emit("prepare", seconds=round(seconds, 3), **dataclasses.asdict(prepared))
        return encoder

    def _restore(self, resumed: Resumed) -> None:
        """The run state saved with the checkpoint resumed: progress, data state, guard history, the mix."""
        ctx, stream = self.ctx, self.stream
        ctx.progress = resumed.progress
        stream.trained_state = resumed.data_state
        ctx.latest_eval = ctx.progress.last_eval
        if ctx.progress.guard is not None:
            self.guard.load_json(ctx.progress.guard)
        if ctx.progress.domain_percent is not None:
            assert stream.plan is not None
            stream.plan = plan_mix(stream.data_at(ctx.progress.domain_percent), stream.plan.shards, ctx.cfg.hold_out())

    def _warn_missing_sets(self) -> None:
        if not self.evaluator.general and self.ctx.denv.is_main:
            log.warning(
                "no general held-out set (eval.general): forgetting cannot be measured, the guard's "
                "forgetting rule cannot fire"
            )
        if not self.evaluator.domain and self.ctx.denv.is_main:
            log.warning("no domain held-out set (eval.domain): the guard's domain-progress rule cannot fire")

    # ---- training ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """The step loop, from the resumed step to maxSteps.

        A step only queues device work: its figures stay on the device until the next read-back (every
        training.logEverySteps steps, and at every evaluation and checkpoint), so between read-backs the loop never
        waits for the device and runs no collective of its own.
        """
        ctx, t = self.ctx, self.ctx.cfg.training
        progress = ctx.progress
        self.stream.start(progress.step)
        pending: list[StepFigures] = []
        window = Throughput()
        watchdog = HangWatchdog(
            WatchdogSettings(ctx.cfg.watchdog.multiple, ctx.cfg.watchdog.floor_seconds), ctx.denv.rank, self._hung
        )
        compiling = t.compile
        if compiling and progress.step < t.max_steps:
            ctx.report_phase("compile")
        try:
            while progress.step < t.max_steps:
                if not compiling:  # the compile phase has no recent median to judge it by
                    watchdog.step_started(progress.step + 1)
                pending.append(self._step(window, compiling))
                compiling = False
                step = progress.step
                due_eval = step % ctx.cfg.eval.every_steps == 0
                due_ckpt = step % ctx.cfg.checkpoints.every_steps == 0 or step == t.max_steps
                if len(pending) < t.log_every_steps and not due_eval and not due_ckpt:
                    watchdog.step_ended()
                    continue
                verdict = self.observer.flush(pending, window)
                pending = []
                self.checkpoints.poll()
                watchdog.step_ended()
                self._evaluate_save_act(step, verdict, due_eval, due_ckpt, window)
        finally:
            watchdog.close()
            self.stream.close()
        self.checkpoints.settle()
        if ctx.denv.is_main:
            emit("finished", step=progress.step, mix=self.stream.mix_report())

    def _step(self, window: Throughput, compiling: bool) -> StepFigures:
        """One optimizer step: its device work queued, its figures left on the device."""
        ctx, observer = self.ctx, self.observer
        waiting = time.perf_counter()
        batch = self.stream.next()
        lr = float(ctx.engine.lr_scheduler.get_last_lr()[0])  # a Python float: no device read
        started = time.perf_counter()
        observer.own.begin(ctx.progress.step + 1)
        world, chunk = ctx.denv.world_size, ctx.cfg.training.loss_chunk_tokens
        part = train_step(ctx.engine, batch.micro, batch.global_loss_tokens, world, chunk, observer.own)
        window.steps += 1
        if compiling:
            observer.compile_phase(time.perf_counter() - started)
            window.restart()
        else:
            observer.clock.add(started - waiting, time.perf_counter() - started, observer.own.seconds)
        ctx.progress.step += 1
        ctx.progress.tokens += ctx.step_tokens
        self.stream.trained_state = batch.state
        return StepFigures(ctx.progress.step, part, lr, device_grad_norm(ctx.engine))

    def _evaluate_save_act(
        self, step: int, verdict: Verdict | None, due_eval: bool, due_ckpt: bool, window: Throughput
    ) -> None:
        """After a read-back: evaluate and save when due, then carry out the guard's verdict, the same on every rank."""
        ctx = self.ctx
        # weights after a non-finite step are neither evaluated nor saved (the guard stops the run)
        broken = verdict is not None and verdict.reason == NON_FINITE
        if (due_eval or due_ckpt) and not broken:
            ctx.report_phase("evaluate")
            ctx.latest_eval = self.evaluator.evaluate(step)
            if verdict is None and ctx.latest_eval is not None:
                verdict = self.guard.observe_eval(ctx.latest_eval)
            broken = verdict is not None and verdict.reason == NON_FINITE  # the same on every rank
        if due_ckpt and not broken:
            self.checkpoints.save(step)
        verdict = ctx.broadcast(verdict)
        stops = verdict is not None and verdict.action == "stop"
        if stops and ctx.denv.is_main:
            self.observer.report_progress()  # the evaluation that stops the run reaches the status before the stop
        if verdict is not None:
            self.actions.act(verdict, saved=due_ckpt and not broken)
        if due_eval or due_ckpt or verdict is not None:
            window.restart()
        if ctx.denv.is_main:
            self.observer.report_progress()

    def _hung(self, message: str) -> None:
        """The watchdog found a hung step: the stacks to the log, the cause to the status, a retryable exit."""
        log.error("%s", message)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        report_exit_error(self.ctx.cfg, HangError(message), EXIT_HANG)
        sys.stderr.flush()
        os._exit(EXIT_HANG)

    def build_candidates(self) -> None:
        """The end-of-run candidates (candidate_builder.py; every rank takes part)."""
        self.candidates.build_all()

    def close(self, ok: bool) -> None:
        """Flush reports and leave the process group (after a barrier when every rank got here cleanly)."""
        flush_s = float(os.environ.get("FORGE_REPORT_FLUSH_S", "30"))
        self.checkpoints.join_retention(flush_s)
        reporter = self.ctx.reporter
        if reporter is not None and not reporter.close(timeout=flush_s):
            log.warning("some status reports could not be delivered")
        if dist.is_initialized():
            try:
                if ok:
                    self.ctx.barrier()
            finally:
                dist.destroy_process_group()


def run(cfg: TrainerConfig) -> None:
    """Train this rank to the end (raises ForgeError subclasses on failure)."""
    stopped = read_stop_marker(cfg)
    if stopped is not None:
        reason = stopped.get("earlyStop", {})
        log.warning(
            "the guard already stopped this run (%s at step %s, %s): not training again; use a new "
            "checkpoints.output to start over",
            reason.get("reason"),
            reason.get("step"),
            storage.join(cfg.checkpoints.output, STOP_MARKER),
        )
        if os.environ.get("RANK", "0") == "0":
            emit("alreadyStopped", **reason)
        return
    r = Run(cfg, dist_env())
    ok = False
    try:
        r.setup()
        r.train()
        r.build_candidates()
        ok = True
    except RuntimeError as err:
        if not is_peer_loss(err):
            raise
        raise PeerLostError(
            f"lost contact with another rank of the job ({_first_line(err)}): it crashed or its node went away; "
            "this rank stops too and the job restarts from the latest complete checkpoint. The cause is in the "
            "other rank's log."
        ) from err
    finally:
        r.close(ok)


# What gloo and NCCL say when a peer process or its connection is gone.
_PEER_LOSS_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
    "NCCL communicator was aborted",
    "Socket Timeout",
)


def is_peer_loss(err: BaseException) -> bool:
    """True when a collective failed because another rank is gone (not because of this rank's own fault)."""
    if isinstance(err, dist.DistNetworkError):
        return True
    text = str(err)
    return any(marker in text for marker in _PEER_LOSS_MARKERS)


def _first_line(err: BaseException) -> str:
    """The gist of a long distributed error message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]  # drop the C++ source location
    return text.split(". ", 1)[0][:200]  # the first sentence: gloo's advice follows it
