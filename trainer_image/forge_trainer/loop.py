"""One training run on one rank: set up, resume, train, evaluate, checkpoint, report."""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from forge_trainer import candidates as cand
from forge_trainer import checkpoint as ckpt
from forge_trainer import probe, retention, sharded, storage
from forge_trainer.config import DOMAIN_GROUP, GENERAL_GROUP, UNSEEN_GROUP, EvalGroup, TrainerConfig
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import (
    Layout,
    MixPlan,
    Prefetcher,
    build_mixer,
    data_state,
    plan_mix,
    plan_report,
    preflight,
    prepare_phase,
    step_batches,
)
from forge_trainer.data.mixer import Mixer
from forge_trainer.engine import (
    DistEnv,
    build_engine,
    deepspeed_config,
    dist_env,
    init_distributed,
    lr_factor,
    seed_everything,
    train_step,
)
from forge_trainer.errors import (
    EXIT_HANG,
    EarlyStopError,
    HangError,
    PeerLostError,
    StorageError,
    StorageUnavailableError,
)
from forge_trainer.evaluate import EvalResult
from forge_trainer.guard import NON_FINITE, Guard, Verdict
from forge_trainer.heldout import EvalSeq, KLCache, SequenceLosses, eval_sequences, evaluate_set
from forge_trainer.metrics import (
    TrainerMetrics,
    create_metrics,
    device_peak_flops,
    flops_per_token,
    metrics_port,
    serve,
)
from forge_trainer.model import (
    count_params,
    export_hf,
    fetch_model,
    file_lock,
    full_numel,
    load_model,
    load_tokenizer,
    pad_token_id,
    save_hf,
)
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
from forge_trainer.phases import RankZeroPhases
from forge_trainer.report import (
    StatusReporter,
    baseline_status,
    checkpoint_entry,
    checkpoint_status,
    chosen_uris,
    kube_patcher,
    kube_status_reader,
    latest_status,
    phase_status,
    progress_status,
    report_exit_error,
    rfc3339,
    status_patch,
)
from forge_trainer.watchdog import HangWatchdog, WatchdogSettings

log = logging.getLogger(__name__)

EvalSet = list[EvalSeq]
# The (domain, general, unseen general) held-out sets.
EvalSets = tuple[EvalSet, EvalSet, EvalSet]
# This rank's per-sequence losses of the base model on the (general, unseen general) sets.
BaseLosses = tuple[SequenceLosses | None, SequenceLosses | None]
T = TypeVar("T")


def emit(event: str, **fields: Any) -> None:
    """A structured event on stdout (one JSON object per line), from rank 0."""
    sys.stdout.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


@dataclass
class Progress:
    """Run state that is saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    baseline: EvalResult | None = None
    last_eval: EvalResult | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, Any] | None = None
    domain_percent: int | None = None  # the mix after a rebalance (None: data.domainPercent)
    rebalance: dict[str, Any] | None = None
    lr_multiplier: float | None = None  # the learning-rate probe's choice (None: no probe)

    def to_json(self) -> dict[str, Any]:
        """JSON form (without the data state, added by the caller)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "baseline": None if self.baseline is None else self.baseline.__dict__,
            "lastEval": None if self.last_eval is None else self.last_eval.__dict__,
            "checkpoints": self.checkpoints,
            "guard": self.guard,
            "domainPercent": self.domain_percent,
            "rebalance": self.rebalance,
            "lrMultiplier": self.lr_multiplier,
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> Progress:
        """Inverse of to_json."""
        base, last = doc.get("baseline"), doc.get("lastEval")
        return Progress(
            step=int(doc["step"]),
            tokens=int(doc["tokens"]),
            baseline=EvalResult(**base) if base else None,
            last_eval=EvalResult(**last) if last else None,
            checkpoints=list(doc.get("checkpoints", [])),
            guard=doc.get("guard"),
            domain_percent=doc.get("domainPercent"),
            rebalance=doc.get("rebalance"),
            lr_multiplier=doc.get("lrMultiplier"),
        )


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
class PendingSave:
    """A checkpoint saved locally whose upload is under way: complete once every rank has confirmed it."""

    step: int
    entry: dict[str, Any]
    upload: ckpt.BackgroundUpload


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


class Run:
    """Everything one rank needs for a run."""

    def __init__(self, cfg: TrainerConfig, denv: DistEnv) -> None:
        self.cfg = cfg
        self.denv = denv
        self.places = ckpt.Places(Path(cfg.checkpoints.local_dir), cfg.checkpoints.output)
        self.layout = Layout(
            denv.world_size, denv.rank, cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps
        )
        self.metrics: TrainerMetrics = create_metrics(cfg.job_name, cfg.namespace, denv.rank)
        self.reporter: StatusReporter | None = None
        self.progress = Progress()
        self.latest_eval: EvalResult | None = None
        self.engine: Any = None
        self.model_dir = Path()
        self.tokenizer: Any = None
        self.plan: MixPlan | None = None
        self.mixer: Mixer | None = None
        self.eval_domain: EvalSet = []
        self.eval_general: EvalSet = []
        self.eval_unseen: EvalSet = []
        self.kl_cache: KLCache | None = None
        self.base_losses: BaseLosses | None = None
        self.flops_token = 0.0
        self.peak = device_peak_flops()
        self.tps: float | None = None
        self.clock = StepClock()
        pace = cfg.pace
        self.pace = PaceWatch(
            PaceSettings(pace.straggler_percent, pace.read_backs, pace.drop_percent), denv.rank, denv.world_size
        )
        self.own = OwnTime(parse_fault(os.environ.get(FAULT_ENV), denv.rank))
        self.peers: list[Peer] | None = None
        self.last_data_state: dict[str, Any] | None = None
        self.encoder: DocEncoder | None = None
        self.prefetch: Prefetcher | None = None
        self.pending_save: PendingSave | None = None
        self.retention_thread: threading.Thread | None = None
        self.guard = Guard(cfg.forgetting, cfg.training.max_steps, cfg.training.learning_rate, cfg.data.domain_percent)
        self.guard.can_rebalance = bool(cfg.data.general)
        self.guard.lr_of = lambda i: self.cfg.training.learning_rate * lr_factor(self.cfg.training, i)

    # ---- setup -------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the job, load model and data, resume if a complete checkpoint exists."""
        cfg, denv = self.cfg, self.denv
        cfg.check_world(denv.world_size)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        init_distributed(denv, int(os.environ.get("FORGE_DIST_TIMEOUT_S", "1800")))
        self.phases = RankZeroPhases(denv.rank, denv.world_size)
        seed_everything(cfg.training.seed, denv.rank)
        serve(self.metrics, metrics_port(cfg.report.metrics_port, denv.local_rank))
        self.metrics.set(self.metrics.total_steps, cfg.training.max_steps)
        self.metrics.set(self.metrics.forgetting_budget, cfg.forgetting.budget_percent)
        if denv.is_main and cfg.report.forge_job is not None:
            ref = cfg.report.forge_job
            self.reporter = StatusReporter(lambda: kube_patcher(ref), cfg.report.min_interval_seconds)
            self._report_phase("setup")
        self.model_dir = fetch_model(cfg.model.base, self.places.local_dir / "base-model")
        self.tokenizer = load_tokenizer(self.model_dir)
        encoder = DocEncoder(self.tokenizer, assistant_only=cfg.model.technique in ("sft", "lora"))
        self.encoder = encoder
        self.plan = plan_mix(cfg.data, hold_out=cfg.hold_out())
        if cfg.data.cache_tokens:
            self.plan, prepared, seconds = prepare_phase(self.plan, cfg, encoder, denv.rank, denv.world_size)
            self.metrics.set(self.metrics.prepare_seconds, seconds)
            if denv.is_main:
                emit("prepare", seconds=round(seconds, 3), **dataclasses.asdict(prepared))
        manifest = self._find_resume()
        state: dict[str, Any] | None = None
        if manifest is not None:
            tag_dir = ckpt.materialise(self.places, manifest, ranks={denv.rank})
            doc = ckpt.read_state(tag_dir)
            self.progress = Progress.from_json(doc)
            state = doc["data"]
            self.last_data_state = state
            self.latest_eval = self.progress.last_eval
            if self.progress.guard is not None:
                self.guard.load_json(self.progress.guard)
            if self.progress.domain_percent is not None:
                self.plan = plan_mix(self._data_at(self.progress.domain_percent), self.plan.shards, self.cfg.hold_out())
        else:
            total = cfg.training.max_steps * self.layout.step_sequences
            preflight(self.plan, cfg, encoder, total)
        pad = pad_token_id(self.tokenizer)
        self.eval_domain = eval_set(cfg, DOMAIN_GROUP, cfg.eval.max_tokens, encoder, pad)
        self.eval_general = eval_set(cfg, GENERAL_GROUP, cfg.eval.max_tokens, encoder, pad)
        self.eval_unseen = eval_set(cfg, UNSEEN_GROUP, cfg.eval.max_tokens, encoder, pad)
        if cfg.training.probe is not None:
            self._settle_learning_rate(resumed=manifest is not None)
            cfg = self.cfg
        model = self._build_model(cfg)
        self._set_flops(model)
        self.engine = build_engine(model, cfg, denv.world_size)
        self._measure_base(resumed=manifest is not None)
        if manifest is not None:
            self._load(manifest)
        if not self.eval_general and denv.is_main:
            log.warning(
                "no general held-out set (eval.general): forgetting cannot be measured, the guard's "
                "forgetting rule cannot fire"
            )
        if not self.eval_domain and denv.is_main:
            log.warning("no domain held-out set (eval.domain): the guard's domain-progress rule cannot fire")
        self.mixer = build_mixer(self.plan, cfg, encoder, state)

    # ---- the learning-rate probe ----------------------------------------------------------------------------------

    def _settle_learning_rate(self, resumed: bool) -> None:
        """training.probe: the learning rate of this run, from this output's earlier probe or from a new one.

        A restart never probes again: it takes the multiple saved with the checkpoint it resumes, else the one in
        <output>/forge-lr-probe.json; a run that resumes without either trains at the configured rate.
        """
        cfg, denv = self.cfg, self.denv
        record = self._read_probe_record()
        multiplier, source = None, ""
        if resumed and self.progress.lr_multiplier is not None:
            multiplier, source = self.progress.lr_multiplier, "checkpoint"
        elif record is not None:
            multiplier, source = record.choice.multiplier, "record"
        if multiplier is not None:
            if denv.is_main:
                lr = cfg.training.learning_rate * multiplier
                emit("probeReused", multiplier=multiplier, learningRate=lr, source=source, uri=self._probe_uri)
        elif resumed:
            log.warning("resuming without a learning-rate probe record: training at the configured learning rate")
            multiplier = 1.0
        else:
            record = self._probe()
            multiplier = self._broadcast(record.choice.multiplier)
            if denv.is_main:
                storage.write_bytes(self._probe_uri, json.dumps(record.to_json(), indent=1).encode())
            seed_everything(cfg.training.seed, denv.rank)  # the run starts from the same RNG state as without it
        self._use_multiplier(multiplier)
        if record is not None and self.reporter is not None:
            self.reporter.submit(status_patch(lrProbe=record.status()))

    @property
    def _probe_uri(self) -> str:
        return storage.join(self.cfg.checkpoints.output, probe.PROBE_FILE)

    def _read_probe_record(self) -> probe.ProbeRecord | None:
        """The record of an earlier probe, read by rank 0 for every rank (None: none, or unusable)."""

        def read() -> dict[str, Any] | None:
            doc = ckpt.read_json_object(self._probe_uri, probe.PROBE_FILE)
            if doc is not None:
                try:
                    probe.ProbeRecord.from_json(doc)
                except ValueError as err:
                    log.warning("ignoring %s: %s", self._probe_uri, err)
                    return None
            return doc

        doc = self._on_main("reading the learning-rate probe's record", read)
        return None if doc is None else probe.ProbeRecord.from_json(doc)

    def _use_multiplier(self, multiplier: float) -> None:
        """Train at ``multiplier`` x the configured peak (and floor) learning rate; the guard follows."""
        training = probe.scaled_training(self.cfg.training, multiplier)
        self.cfg = self.cfg.model_copy(update={"training": training})
        self.guard.learning_rate = training.learning_rate
        self.progress.lr_multiplier = multiplier
        if self.denv.is_main:
            log.info("learning rate %.6g (%gx the configured rate)", training.learning_rate, multiplier)

    def _probe(self) -> probe.ProbeRecord:
        """Short runs at every multiple, ascending, from the base weights (every rank takes part); the choice."""
        cfg, denv = self.cfg, self.denv
        settings = cfg.training.probe
        assert settings is not None and self.encoder is not None
        pad = pad_token_id(self.tokenizer)
        max_tokens = min(settings.eval_max_tokens, cfg.eval.max_tokens)
        sets = (
            eval_set(cfg, DOMAIN_GROUP, max_tokens, self.encoder, pad),
            eval_set(cfg, GENERAL_GROUP, max_tokens, self.encoder, pad),
            eval_set(cfg, UNSEEN_GROUP, max_tokens, self.encoder, pad),
        )
        baseline: EvalResult | None = None
        results: list[probe.MultipleResult] = []
        for multiplier in sorted(settings.multipliers):
            run_cfg = cfg.model_copy(update={"training": probe.probe_training(cfg.training, multiplier)})
            started = time.perf_counter()
            seed_everything(cfg.training.seed, denv.rank)  # every multiple starts from the same state
            model = self._build_model(run_cfg)
            engine = build_engine(model, run_cfg, denv.world_size)
            try:
                if baseline is None:
                    baseline, _, _ = measure_heldout(engine.module, engine.device, sets, cfg, denv, 0, None)
                    assert baseline is not None
                points, finite = self._probe_run(engine, run_cfg, sets, baseline)
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

    def _probe_run(
        self, engine: Any, run_cfg: TrainerConfig, sets: EvalSets, baseline: EvalResult
    ) -> tuple[list[probe.ProbePoint], bool]:
        """One probe run on the real stream from its start: (its evaluations, whether every figure was finite)."""
        settings = self.cfg.training.probe
        assert settings is not None and self.plan is not None and self.encoder is not None
        t, world = run_cfg.training, self.denv.world_size
        due = set(probe.eval_steps(t.max_steps, settings.evaluations))
        mixer = build_mixer(self.plan, run_cfg, self.encoder)
        prefetch = Prefetcher(step_batches(mixer, self.plan, run_cfg, self.layout, 0))
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
                ev, _, _ = measure_heldout(engine.module, engine.device, sets, run_cfg, self.denv, step, baseline)
                forgetting = ev.forgetting_percent if ev is not None else None
                if forgetting is None or not math.isfinite(forgetting):
                    return points, False
                assert ev is not None
                points.append(probe.ProbePoint(step, probe.cumulative_lr(t, step), forgetting, ev.domain_gain_percent))
        finally:
            prefetch.close()
        return points, True

    def _build_model(self, cfg: TrainerConfig) -> torch.nn.Module:
        """The model to hand the engine: under ZeRO-3 built partitioned (no rank ever holds all of it), else whole."""
        t = cfg.training
        if t.zero_stage == 3:
            ds_config = deepspeed_config(cfg, self.denv.world_size)
            return sharded.build_partitioned(self.model_dir, cfg.model, ds_config, t.activation_checkpointing)
        return load_model(self.model_dir, cfg.model, t.activation_checkpointing)

    def _find_resume(self) -> dict[str, Any] | None:
        """The newest complete checkpoint in the output (rank 0 reads, every rank gets it, or the read error)."""
        found = self._on_main(
            "finding the checkpoint to resume from", lambda: ckpt.latest_resumable(self.cfg.checkpoints.output)
        )
        if found is not None:
            uri = self.places.remote(int(found["step"]))
            ckpt.check_world_size(found, self.denv.world_size, uri)
            if self.denv.is_main:
                log.info("resuming from %s", uri)
        return found

    def _load(self, manifest: dict[str, Any]) -> None:
        step = int(manifest["step"])
        tag_dir = self.places.local(step)
        lora = self.cfg.model.technique == "lora"
        path, _ = self.engine.load_checkpoint(str(tag_dir), tag=f"global_step{step}", load_module_strict=not lora)
        if path is None:
            raise StorageError(f"{tag_dir}: DeepSpeed could not load the checkpoint")
        ckpt.load_rng(tag_dir, self.denv.rank)
        if self.denv.is_main:
            emit("resumed", step=step, uri=self.places.remote(step))

    def _set_flops(self, model: torch.nn.Module) -> None:
        total, trainable = count_params(model)
        mcfg: Any = getattr(model, "config", None)
        layers = int(getattr(mcfg, "num_hidden_layers", 0) or 0)
        hidden = int(getattr(mcfg, "hidden_size", 0) or 0)
        get_emb: Any = getattr(model, "get_input_embeddings", None)
        emb: Any = get_emb() if get_emb is not None else None
        tied = bool(getattr(mcfg, "tie_word_embeddings", False))
        emb_params = full_numel(emb.weight) if emb is not None and not tied else 0
        self.flops_token = flops_per_token(total - emb_params, layers, hidden, self.cfg.data.seq_length)
        if self.denv.is_main:
            log.info("model: %d parameters, %d trainable", total, trainable)

    # ---- training ------------------------------------------------------------------------------------------

    def train(self) -> None:
        """The step loop, from the resumed step to maxSteps.

        A step only queues device work: its figures stay on the device until the next read-back (every
        training.logEverySteps steps, and at every evaluation and checkpoint), so between read-backs the loop never
        waits for the device and runs no collective of its own.
        """
        cfg = self.cfg
        t = cfg.training
        assert self.mixer is not None and self.plan is not None
        self.prefetch = Prefetcher(step_batches(self.mixer, self.plan, cfg, self.layout, self.progress.step))
        pending: list[StepFigures] = []
        window = Throughput()
        step_tokens = self.layout.step_sequences * cfg.data.seq_length
        watchdog = HangWatchdog(
            WatchdogSettings(cfg.watchdog.multiple, cfg.watchdog.floor_seconds), self.denv.rank, self._hung
        )
        compiling = t.compile
        if compiling and self.progress.step < t.max_steps:
            self._report_phase("compile")
        try:
            while self.progress.step < t.max_steps:
                if not compiling:  # the compile phase has no recent median to judge it by
                    watchdog.step_started(self.progress.step + 1)
                waiting = time.perf_counter()
                batch = self.prefetch.next()
                lr = float(self.engine.lr_scheduler.get_last_lr()[0])  # a Python float: no device read
                started = time.perf_counter()
                self.own.begin(self.progress.step + 1)
                part = train_step(
                    self.engine,
                    batch.micro,
                    batch.global_loss_tokens,
                    self.denv.world_size,
                    t.loss_chunk_tokens,
                    self.own,
                )
                window.steps += 1
                if compiling:
                    compiling = False
                    self._compile_phase(time.perf_counter() - started)
                    window.restart()
                else:
                    self.clock.add(started - waiting, time.perf_counter() - started, self.own.seconds)
                self.progress.step += 1
                self.progress.tokens += step_tokens
                self.last_data_state = batch.state
                step = self.progress.step
                pending.append(StepFigures(step, part, lr, device_grad_norm(self.engine)))
                due_eval = step % cfg.eval.every_steps == 0
                due_ckpt = step % cfg.checkpoints.every_steps == 0 or step == t.max_steps
                if len(pending) < t.log_every_steps and not due_eval and not due_ckpt:
                    watchdog.step_ended()
                    continue
                verdict = self._flush(pending, window)
                pending = []
                self._poll_save()
                watchdog.step_ended()
                # weights after a non-finite step are neither evaluated nor saved (the guard stops the run)
                broken = verdict is not None and verdict.reason == NON_FINITE
                if (due_eval or due_ckpt) and not broken:
                    self._report_phase("evaluate")
                    self.latest_eval = self._evaluate(step)
                    if verdict is None and self.latest_eval is not None:
                        verdict = self.guard.observe_eval(self.latest_eval)
                    broken = verdict is not None and verdict.reason == NON_FINITE  # the same on every rank
                if due_ckpt and not broken:
                    self._checkpoint(step)
                verdict = self._broadcast(verdict)
                stops = verdict is not None and verdict.action == "stop"
                if stops and self.denv.is_main:
                    self._report_progress()  # the evaluation that stops the run reaches the status before the stop
                if verdict is not None:
                    self._act(verdict, saved=due_ckpt and not broken)
                if due_eval or due_ckpt or verdict is not None:
                    window.restart()
                if self.denv.is_main:
                    self._report_progress()
        finally:
            watchdog.close()
            self.prefetch.close()
        self._settle_save()
        if self.denv.is_main:
            emit("finished", step=self.progress.step, mix=self.mix_report())

    def _hung(self, message: str) -> None:
        """The watchdog found a hung step: the stacks to the log, the cause to the status, a retryable exit."""
        log.error("%s", message)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        report_exit_error(self.cfg, HangError(message), EXIT_HANG)
        sys.stderr.flush()
        os._exit(EXIT_HANG)

    def _compile_phase(self, started_s: float) -> None:
        """The first step with training.compile traces and compiles the model: a phase of its own, reported as the
        ``compile`` event and metric, not counted in tokens per second. One device sync, once per process."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = started_s
        self.metrics.set(self.metrics.compile_seconds, seconds)
        if self.denv.is_main:
            emit("compile", step=self.progress.step + 1, seconds=round(seconds, 3))
            log.info("compile phase: the first step took %.1f s (not counted in tokens per second)", seconds)

    # ---- the guard -------------------------------------------------------------------------------------------

    def _data_at(self, domain_percent: int) -> Any:
        return self.cfg.data.model_copy(update={"domain_percent": domain_percent})

    def _act(self, verdict: Verdict, saved: bool) -> None:
        """Carry out a guard verdict (every rank, the same verdict)."""
        if verdict.action == "rebalance" and self.progress.step >= self.cfg.training.max_steps:
            verdict = dataclasses.replace(verdict, action="warn")  # nothing left to rebalance
        self.metrics.inc(self.metrics.guard_verdicts, reason=verdict.reason)
        if self.denv.is_main:
            emit("guard", **verdict.status())
            log.warning("guard: %s (%s): %s", verdict.reason, verdict.action, verdict.message)
        patch: dict[str, Any] = {"earlyStop": verdict.status()}
        if verdict.action == "rebalance" and verdict.domain_percent is not None:
            patch["rebalance"] = self._rebalance(verdict)
        if self.reporter is not None:
            self.reporter.submit(status_patch(**patch))
        if verdict.action != "stop":
            return
        if not saved and verdict.reason != "NonFiniteLoss":
            self._checkpoint(self.progress.step)
        self._settle_save()
        self._on_main("writing the early-stop marker", lambda: write_stop_marker(self.cfg, verdict))
        if verdict.reason != "NonFiniteLoss":
            self.build_candidates()
        raise EarlyStopError(f"stopped by the guard at step {verdict.step}: {verdict.reason}: {verdict.message}")

    def _rebalance(self, verdict: Verdict) -> dict[str, Any]:
        """Raise the general share for the rest of the run: a new plan and mixer from the current data state."""
        assert verdict.domain_percent is not None and self.prefetch is not None and self.encoder is not None
        assert self.last_data_state is not None and self.plan is not None
        previous = self.guard.domain_percent
        new_dp = verdict.domain_percent
        self.prefetch.close()
        plan = plan_mix(self._data_at(new_dp), self.plan.shards, self.cfg.hold_out())
        state = dict(self.last_data_state)
        old_sources = list(state["sources"])
        state["sources"] = old_sources + [None] * (len(plan.sources) - len(old_sources))
        state["current"] = [0] * len(plan.sources)
        state["fingerprint"] = plan.fingerprint(self.cfg.training.seed, self.cfg.data.seq_length)
        self.plan = plan
        self.mixer = build_mixer(plan, self.cfg, self.encoder, state)
        # the stream's state now (before the prefetch thread advances the mixer), in the new plan's shape
        self.last_data_state = data_state(self.mixer, plan, self.cfg)
        self.prefetch = Prefetcher(step_batches(self.mixer, plan, self.cfg, self.layout, self.progress.step))
        self.guard.rebalanced(new_dp)
        self.progress.domain_percent = new_dp
        self.progress.rebalance = {
            "step": self.progress.step,
            "domainPercent": new_dp,
            "previousDomainPercent": previous,
            "reason": f"{verdict.reason}: {verdict.message}",
        }
        if self.denv.is_main:
            emit("rebalance", **self.progress.rebalance)
        return self.progress.rebalance

    def mix_report(self) -> dict[str, Any] | None:
        """The realised mix of the data trained on so far (the prefetcher runs ahead of training)."""
        if self.last_data_state is None or self.plan is None:
            return None
        return plan_report(self.plan, self.last_data_state)

    def _flush(self, pending: list[StepFigures], window: Throughput) -> Verdict | None:
        """Read back the pending steps' figures (one all-reduce, one device sync); export, log and guard each step.

        The all-reduce also carries each rank's pace (its median own step time, at its place among zeros)."""
        n, world = len(pending), self.denv.world_size
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
        step_tokens = self.layout.step_sequences * self.cfg.data.seq_length
        settled = not window.restarted
        rate = window.update(step_tokens)
        self.tps = rate or self.tps
        m = self.metrics
        m.set(m.step, self.progress.step)
        m.inc(m.tokens, step_tokens * n / self.denv.world_size)
        if self.tps is not None:
            m.set(m.tokens_per_second, self.tps / self.denv.world_size)
        m.set(m.loss, values[n - 1])
        m.set(m.learning_rate, pending[-1].lr)
        if norms[-1] is not None:
            m.set(m.grad_norm, norms[-1])
        mfu = self.mfu()
        if mfu is not None:
            m.set(m.mfu, mfu)
        mix = self.mix_report()
        for row in mix["sources"] if mix else []:
            m.set(m.data_tokens, row["tokens"], group=row["group"], source=row["uri"])
        self._observe_pace(values[n : n + world], rate, settled)
        verdict: Verdict | None = None
        for p, loss, norm in zip(pending, values[:n], norms, strict=True):
            if self.denv.is_main:
                extra = {} if norm is None else {"gradNorm": norm}
                tps = None if self.tps is None else round(self.tps, 1)  # None: only the compile step so far
                emit("step", step=p.step, loss=loss, lr=p.lr, tokensPerSecond=tps, **extra)
            found = self.guard.observe_step(p.step, loss, p.lr, norm)
            verdict = verdict or found
        return verdict

    def _observe_pace(self, times: list[float], rate: float | None, settled: bool) -> None:
        """Every rank: export its pace and judge the gathered figures; rank 0 reports what changed (pace.py)."""
        m = self.metrics
        own, wait = self.clock.median_own(), self.clock.data_wait_ratio()
        if own is not None:
            m.set(m.rank_step_seconds, own)
        if wait is not None:
            m.set(m.data_wait, wait)
        if self.peers is None:  # once per process, at the first read-back (every rank is there)
            mine: list[Any] = [local_peer()]
            if self.denv.world_size > 1:
                mine = [None] * self.denv.world_size
                dist.all_gather_object(mine, local_peer())
            self.peers = mine
        before, reported = self.pace.findings, self.pace.reported
        found = self.pace.observe(times, rate, settled)
        named = found.straggler.rank if found.straggler is not None else None
        m.set(m.straggler, 1 if named == self.denv.rank else 0)
        if not self.denv.is_main or (reported and before.key == found.key):
            return
        self.pace.reported = True
        doc = pace_status(found, self.denv.world_size, self.peers, self.progress.step, rfc3339())
        emit("pace", **doc)
        for finding in (found.straggler, found.drop):
            if finding is not None:
                log.warning("%s: %s", finding.reason, finding.message)
        if self.reporter is not None:
            self.reporter.submit(status_patch(pace=doc))

    def mfu(self) -> float | None:
        """Model FLOPs utilisation of this rank's device, or None on CPU."""
        if self.peak is None or self.tps is None:
            return None
        return self.tps / self.denv.world_size * self.flops_token / self.peak

    def _measure_base(self, resumed: bool) -> None:
        """The base model's pass (before any checkpoint is loaded): the baseline on a first start, and on every start
        this rank's KL cache and per-sequence general losses (kept in memory, not in checkpoints: rebuilding them
        costs one evaluation)."""
        need_base = bool(self.eval_general or self.eval_unseen)
        if resumed and (not need_base or self.progress.baseline is None):
            return
        ev = self._measure(0, build_cache=need_base)
        if resumed or ev is None:
            return
        self.progress.baseline = ev
        self.latest_eval = ev
        self._record(ev)
        if self.denv.is_main:
            self._report_baseline()

    def _measure(self, step: int, build_cache: bool = False, module: Any = None) -> EvalResult | None:
        """Held-out figures of the model being trained, or of ``module`` (every rank takes part)."""
        if not self.eval_domain and not self.eval_general and not self.eval_unseen:
            return None
        ev, cache, sequences = measure_heldout(
            self.engine.module if module is None else module,
            self.engine.device,
            (self.eval_domain, self.eval_general, self.eval_unseen),
            self.cfg,
            self.denv,
            step,
            self.progress.baseline if step else None,
            kl_cache=None if build_cache else self.kl_cache,
            build_top_k=self.cfg.eval.kl_top_k if build_cache else 0,
            base_losses=None if build_cache else self.base_losses,
        )
        if build_cache:
            self.kl_cache = cache if self.cfg.eval.kl_top_k > 0 else None
            self.base_losses = sequences
        return ev

    def _record(self, ev: EvalResult) -> None:
        """Export one evaluation (every rank) and log it (rank 0)."""
        m = self.metrics
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
        uris = [s.uri for s in self.cfg.eval_group(GENERAL_GROUP)[0]]
        for uri, loss in zip(uris, ev.general_source_losses or [], strict=False):
            if loss is not None:
                m.set(m.general_source_loss, loss, source=uri)
        for uri, forgetting in zip(uris, ev.general_source_forgetting or [], strict=False):
            if forgetting is not None:
                m.set(m.general_source_forgetting, forgetting, source=uri)
        if self.denv.is_main:
            emit("eval", **ev.__dict__)

    def _evaluate(self, step: int) -> EvalResult | None:
        ev = self._measure(step)
        if ev is not None:
            self._record(ev)
        return ev

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        if self.denv.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if self.denv.world_size > 1:
            dist.barrier()

    def _checkpoint(self, step: int) -> None:
        """Save the checkpoint of ``step`` to local disk (every rank) and start uploading it in the background.

        The previous save is settled first (one upload at a time), and local disk is pruned before the save. The
        checkpoint becomes complete, is reported and is emitted when every rank has confirmed its upload
        (``_poll_save``).
        """
        cfg, denv, places = self.cfg, self.denv, self.places
        self._settle_save()
        if not self._output_is_local:
            ckpt.prune_local(places, cfg.checkpoints.keep - 1)  # frees disk before the save; the output has them
        save_id = self._broadcast(ckpt.new_save_id() if denv.is_main else None)
        ckpt.prepare_local(places, step, save_id)
        self._barrier()
        tag_dir = places.local(step)
        self.engine.save_checkpoint(
            str(tag_dir),
            tag=f"global_step{step}",
            save_latest=False,
            exclude_frozen_parameters=cfg.model.technique == "lora",
        )
        ckpt.save_rng(tag_dir, denv.rank)
        if cfg.checkpoints.export_hf and cfg.training.zero_stage == 3:
            self._export_live(tag_dir / "hf")  # every rank gathers its partitions
        entry = checkpoint_entry(step, places.remote(step), self.latest_eval)
        self.progress.guard = self.guard.to_json()

        def rank0_part() -> None:
            if cfg.checkpoints.export_hf and cfg.training.zero_stage != 3:
                self._export_live(tag_dir / "hf")  # rank 0 writes the export (and merges LoRA adapters)
            self.progress.last_eval = self.latest_eval
            state = self.progress.to_json()
            state["checkpoints"] = [*self.progress.checkpoints, entry]
            state["data"] = self.last_data_state
            state["mix"] = self.mix_report()
            ckpt.write_json(tag_dir / ckpt.STATE_FILE, state)

        self._on_main(f"checkpoint {ckpt.tag_for(step)}: the hf/ export and the trainer state", rank0_part)
        self.pending_save = PendingSave(step, entry, ckpt.BackgroundUpload(places, step, denv.rank))
        if self._output_is_local or not cfg.checkpoints.background_upload:
            self._settle_save()

    @property
    def _output_is_local(self) -> bool:
        """True when checkpoints are written straight into the output (nothing to upload)."""
        return storage.same_place(str(self.places.local_dir), self.places.output)

    def _settle_save(self) -> None:
        """Wait for the pending save's uploads on every rank and complete it (every rank takes part)."""
        if self.pending_save is not None:
            self.pending_save.upload.wait()
            self._poll_save()

    def _poll_save(self) -> None:
        """Every rank says how its upload of the pending save stands; once all are done rank 0 writes the manifest.

        A failed upload on any rank ends the run on every rank at this point, with that rank's error (nobody waits
        for a timeout). Called at steps every rank agrees on (the flush points), so its collectives line up.
        """
        pending = self.pending_save
        if pending is None:
            return
        upload, world = pending.upload, self.denv.world_size
        running = upload.running  # read first: once the thread has ended, its error is final
        failed_here = not running and upload.error is not None
        flags = torch.tensor([int(failed_here), int(running)], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, running = (bool(x) for x in flags.tolist())
        if failed:
            self.pending_save = None
            raise self._upload_failure(pending)
        if running:
            return
        self.pending_save = None
        gathered: list[Any] = [upload.files]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, upload.files)
        manifest = self._on_main(
            f"checkpoint {ckpt.tag_for(pending.step)}: the manifest", lambda: self._publish(pending, gathered)
        )
        if not self.denv.is_main:
            # Nodes other than rank 0's hold only their own shards; marking their copy complete lets prune work
            # there (resume still checks every file against the manifest and downloads what a node lacks).
            ckpt.write_local_manifest(self.places, pending.step, manifest)
        self.progress.checkpoints = self._broadcast(self.progress.checkpoints)
        self.metrics.inc(self.metrics.checkpoints)
        if self._output_is_local:
            ckpt.prune_local(self.places, self.cfg.checkpoints.keep)

    def _upload_failure(self, pending: PendingSave) -> StorageError:
        """The error every rank raises when some rank's upload failed: the first failing rank's, named."""
        mine = pending.upload.error
        info = None if mine is None else (type(mine).__name__, str(mine), isinstance(mine, StorageUnavailableError))
        gathered: list[Any] = [info]
        if self.denv.world_size > 1:
            gathered = [None] * self.denv.world_size
            dist.all_gather_object(gathered, info)
        rank, (kind, message, retryable) = next((r, e) for r, e in enumerate(gathered) if e is not None)
        text = f"checkpoint {ckpt.tag_for(pending.step)}: upload failed on rank {rank}: {kind}: {message}"
        return StorageUnavailableError(text) if retryable else StorageError(text)

    def _publish(self, pending: PendingSave, gathered: list[Any]) -> dict[str, Any]:
        """Rank 0: write the manifest of a save every rank has uploaded, and report the checkpoint."""
        cfg, places = self.cfg, self.places
        all_files = sorted({tuple(f) for fs in gathered for f in fs})
        meta = {
            "worldSize": self.denv.world_size,
            "zeroStage": cfg.training.zero_stage,
            "technique": cfg.model.technique,
            "tokens": self.progress.tokens,
        }
        manifest = ckpt.make_manifest(pending.step, [(p, s) for p, s in all_files], pending.entry, meta)
        ckpt.publish_manifest(places, pending.step, manifest)
        self.progress.checkpoints.append(pending.entry)
        seconds = pending.upload.seconds
        emit(
            "checkpoint",
            step=pending.step,
            uri=places.remote(pending.step),
            files=len(all_files),
            uploadSeconds=None if seconds is None else round(seconds, 3),
        )
        if self.reporter is not None:
            self.reporter.submit(status_patch(**checkpoint_status(self.progress.checkpoints)))
        self._start_retention()
        return manifest

    def _start_retention(self) -> None:
        """Rank 0: a retention pass over the output in the background, after a save became complete."""
        if self.cfg.checkpoints.output_retention == "keepAll" or self._output_is_local:
            return
        if self.retention_thread is not None and self.retention_thread.is_alive():
            return  # the next completed save starts another pass
        self.retention_thread = threading.Thread(target=self._retention_pass, name="forge-retention", daemon=True)
        self.retention_thread.start()

    def _retention_pass(self) -> None:
        cfg = self.cfg.checkpoints
        try:
            chosen: list[str] = []
            if self.cfg.report.forge_job is not None:
                chosen = chosen_uris(kube_status_reader(self.cfg.report.forge_job)())
            for slimmed in retention.apply_retention(cfg.output, cfg.keep_resumable, chosen):
                emit("retention", step=slimmed.step, droppedFiles=slimmed.files, droppedBytes=slimmed.bytes)
        except Exception as err:  # retention saves space; it must never end the run. The next pass tries again.
            log.warning("output retention pass skipped: %s: %s", type(err).__name__, err)

    def _on_main(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand every rank its result, or its error, raised on every rank at once; the
        others wait under the rank-0 phase timeout (phases.py), not the training collectives'."""
        return self.phases.run(what, fn)

    def _export_live(self, out_dir: Path) -> None:
        cfg = self.cfg
        if cfg.training.zero_stage == 3:
            # one parameter gathered at a time, written by rank 0 into shards as they fill
            lora = cfg.model.technique == "lora"
            sharded.export_partitioned(self.engine.module, out_dir, self.tokenizer, self.denv.is_main, lora=lora)
            return
        if not self.denv.is_main:
            return
        sd = self.engine.module.state_dict()
        if cfg.model.technique == "lora":
            export_hf(sd, self.model_dir, cfg.model, out_dir, self.tokenizer)
        else:
            save_hf(self.engine.module, out_dir, self.tokenizer, state_dict=sd)

    # ---- end-of-run candidates --------------------------------------------------------------------------------

    def build_candidates(self) -> None:
        """Build, evaluate, publish and report the end-of-run candidates (every rank takes part).

        Rank 0 builds each candidate from the hf/ exports and uploads it; every rank loads it and evaluates its share
        of the held-out sets. A candidate that cannot be built is logged and skipped, never fatal: the run's
        checkpoints are complete already.
        """
        cfg, denv = self.cfg, self.denv
        settings = cfg.checkpoints.candidates
        if settings.average_last < 2 and not settings.interpolation_alphas:
            return
        self._report_phase("candidates")
        if not cfg.checkpoints.export_hf or not (self.eval_domain or self.eval_general or self.eval_unseen):
            if denv.is_main:
                log.warning("no end-of-run candidates: they need checkpoints.exportHf and held-out sets")
            return
        plans = self._on_main("listing the checkpoints for candidates", self._candidate_plans)
        try:
            for plan in plans:
                self._candidate(plan)
        finally:
            if denv.is_main:
                shutil.rmtree(self._candidate_inputs, ignore_errors=True)
        if denv.is_main and self.reporter is not None:
            self.reporter.submit(status_patch(**checkpoint_status(self.progress.checkpoints)))

    def _candidate_plans(self) -> list[cand.CandidatePlan]:
        steps = [int(m["step"]) for m in ckpt.complete_checkpoints(self.cfg.checkpoints.output)]
        return cand.plan_candidates(steps, self.cfg.checkpoints.candidates)

    def _candidate(self, plan: cand.CandidatePlan) -> None:
        cfg, denv = self.cfg, self.denv
        uri = cand.candidate_uri(cfg.checkpoints.output, plan)
        local_dir = self.places.local_dir / cand.CANDIDATES_DIR / plan.name

        def build_or_reuse() -> tuple[str, Any]:
            """Rank 0: reuse an earlier publication of the same candidate, or build and upload it."""
            try:
                earlier = cand.published_entry(uri)
                return ("done", earlier) if earlier is not None else ("built", self._build(plan, local_dir, uri))
            except Exception as err:  # reported; the run's own checkpoints stand
                log.warning("candidate %s not built: %s: %s", plan.name, type(err).__name__, err)
                emit("candidateFailed", name=plan.name, error=f"{type(err).__name__}: {err}")
                return ("skip", None)

        state, value = self._on_main(f"candidate {plan.name}: build and upload", build_or_reuse)
        if state == "done":
            if denv.is_main:
                emit("candidateReused", name=plan.name, uri=uri)
            self._add_candidate_entry(value)
            return
        if state != "built":
            return
        files: list[tuple[str, int]] = value
        module: Any = None
        try:
            with file_lock(self.places.lock):
                folder = cand.fetch_files(uri, local_dir, files)
            module = self._load_candidate(folder)
            ok = True
        except Exception as err:  # every rank must agree before the collective evaluation
            log.warning("candidate %s not loaded on rank %d: %s", plan.name, denv.rank, err)
            ok = False
        try:
            if not self._all(ok):
                return
            ev = self._measure(plan.step, module=module)
            del module
            if ev is not None and denv.is_main:
                entry = {**checkpoint_entry(plan.step, uri, ev), **plan.status_fields()}
                cand.publish_manifest(local_dir, uri, files, entry)
                shown = {k: v for k, v in entry.items() if k not in ("uri", "complete")}
                emit("candidate", name=plan.name, uri=uri, **shown)
                self._add_candidate_entry(entry)
        finally:
            # The durable copy is in the output; a node's scratch disk keeps at most one candidate at a time.
            self._barrier()
            if denv.local_rank == 0:
                shutil.rmtree(local_dir, ignore_errors=True)

    def _build(self, plan: cand.CandidatePlan, local_dir: Path, uri: str) -> list[tuple[str, int]]:
        tuned = [self._hf_folder(step) for step in (plan.average_of or (plan.step,))]
        if plan.kind == "average":
            weights = cand.iter_average([cand.WeightFolder(f) for f in tuned])
        else:
            assert plan.alpha is not None
            base = cand.WeightFolder(self.model_dir)
            weights = cand.iter_interpolate(base, cand.WeightFolder(tuned[-1]), plan.alpha)
        cand.write_folder(weights, tuned[-1], local_dir)  # tensor by tensor, into shards as they fill
        return cand.upload_files(local_dir, uri)

    def _hf_folder(self, step: int) -> Path:
        """The hf/ export of a complete checkpoint on local disk: the local copy, or a download into the candidates'
        scratch folder when the checkpoint was pruned locally or written by another node."""
        local = self.places.local(step)
        if (local / ckpt.MANIFEST).is_file() and (local / ckpt.HF_DIR).is_dir():
            return local / ckpt.HF_DIR
        manifest = ckpt.read_manifest(self.places.remote(step))
        if manifest is None:
            raise StorageError(f"checkpoint {self.places.remote(step)} is not complete")
        folder = self._candidate_inputs / ckpt.tag_for(step) / ckpt.HF_DIR
        prefix = ckpt.HF_DIR + "/"
        files = [(f["path"][len(prefix) :], int(f["size"])) for f in manifest["files"] if f["path"].startswith(prefix)]
        if not files:
            raise StorageError(f"checkpoint {self.places.remote(step)} has no {prefix} export")
        return cand.fetch_files(storage.join(self.places.remote(step), ckpt.HF_DIR), folder, files)

    @property
    def _candidate_inputs(self) -> Path:
        """Scratch folder for checkpoint exports downloaded to build candidates (removed afterwards)."""
        return self.places.local_dir / cand.CANDIDATES_DIR / ".inputs"

    def _load_candidate(self, folder: Path) -> Any:
        """The module that evaluates a candidate. Under ZeRO-3 the engine's own partitioned module, each rank reading
        its own rows of the candidate into its partitions (training is over: no second model is built); otherwise
        the candidate loaded whole."""
        if self.cfg.training.zero_stage == 3:
            sharded.load_partitions(self.engine.module, folder, rename=self.cfg.model.technique == "lora")
            return self.engine.module
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if self.cfg.training.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation=self.cfg.model.attention_implementation
        )
        return model.to(self.engine.device)

    def _add_candidate_entry(self, entry: dict[str, Any]) -> None:
        if not self.denv.is_main:
            return
        key = (entry.get("kind"), entry.get("step"), entry.get("alpha"), tuple(entry.get("averageOf") or ()))
        kept = [
            e
            for e in self.progress.checkpoints
            if (e.get("kind"), e.get("step"), e.get("alpha"), tuple(e.get("averageOf") or ())) != key
        ]
        self.progress.checkpoints = [*kept, entry]

    def _all(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank."""
        if self.denv.world_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # ---- reports -------------------------------------------------------------------------------------------

    def _report_baseline(self) -> None:
        if self.reporter is not None and self.progress.baseline is not None:
            self.reporter.submit(status_patch(baseline=baseline_status(self.progress.baseline)))

    def _report_phase(self, phase: str) -> None:
        """A phase other than train begins (rank 0): reported within a second, for the operator's stall check."""
        if self.reporter is not None:
            self.reporter.submit(status_patch(progress=phase_status(phase)))

    def _report_progress(self) -> None:
        if self.reporter is None:
            return
        t = self.cfg.training
        eta = None
        if self.tps:
            remaining_tokens = (
                (t.max_steps - self.progress.step) * self.layout.step_sequences * self.cfg.data.seq_length
            )
            eta = remaining_tokens / self.tps
        lr = float(self.engine.lr_scheduler.get_last_lr()[0])
        mix = self.mix_report()
        step_s, wait = self.clock.median_step(), self.clock.data_wait_ratio()
        interval = self.cfg.report.min_interval_seconds
        self.reporter.submit(
            status_patch(
                progress=progress_status(
                    self.progress.step,
                    t.max_steps,
                    self.progress.tokens,
                    eta,
                    step_seconds=step_s,
                    report_interval_seconds=None if step_s is None else max(interval, t.log_every_steps * step_s),
                    data_wait_percent=None if wait is None else 100 * wait,
                ),
                latest=latest_status(
                    self.latest_eval,
                    self.tps,
                    self.mfu(),
                    lr,
                    mix["realisedDomainPercent"] if mix else None,
                    [s.uri for s in self.cfg.eval_group(GENERAL_GROUP)[0]],
                    mix["realisedDomainGradientPercent"] if mix else None,
                ),
            )
        )

    def close(self, ok: bool) -> None:
        """Flush reports and leave the process group (after a barrier when every rank got here cleanly)."""
        flush_s = float(os.environ.get("FORGE_REPORT_FLUSH_S", "30"))
        if self.retention_thread is not None:
            self.retention_thread.join(flush_s)
        if self.reporter is not None and not self.reporter.close(timeout=flush_s):
            log.warning("some status reports could not be delivered")
        if dist.is_initialized():
            try:
                if ok:
                    self._barrier()
            finally:
                dist.destroy_process_group()


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


STOP_MARKER = "forge-early-stop.json"


def write_stop_marker(cfg: TrainerConfig, verdict: Verdict) -> None:
    """Record the stop next to the checkpoints: a restarted pod must not train again."""
    doc = {"version": 1, "earlyStop": verdict.status()}
    storage.write_bytes(storage.join(cfg.checkpoints.output, STOP_MARKER), json.dumps(doc).encode())


def read_stop_marker(cfg: TrainerConfig) -> dict[str, Any] | None:
    """The earlier stop of this run (same output), if any."""
    return ckpt.read_json_object(storage.join(cfg.checkpoints.output, STOP_MARKER), STOP_MARKER)


def output_uri(cfg: TrainerConfig, step: int) -> str:
    """Where the checkpoint of ``step`` lands."""
    return storage.join(cfg.checkpoints.output, ckpt.tag_for(step))


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
