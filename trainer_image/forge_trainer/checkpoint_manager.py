"""The run's checkpoints (every rank): save locally, upload in the background, complete a save once every rank has
uploaded it (the manifest), retention over the output, resume, and the early-stop marker.

The checkpoint format and its file-level bookkeeping are in checkpoint.py; output retention's rules in retention.py.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from forge_trainer import checkpoint as ckpt
from forge_trainer import retention, sharded, storage
from forge_trainer.config import TrainerConfig
from forge_trainer.context import RankContext
from forge_trainer.data_stream import DataStream
from forge_trainer.errors import StorageError, StorageUnavailableError
from forge_trainer.events import emit
from forge_trainer.guard import Guard, Verdict
from forge_trainer.hf_export import write_hf_folder
from forge_trainer.model import save_hf
from forge_trainer.report import (
    checkpoint_entry,
    checkpoint_status,
    chosen_uris,
    kube_status_reader,
)
from forge_trainer.state import Progress, TrainerStateDoc

log = logging.getLogger(__name__)

STOP_MARKER = "forge-early-stop.json"


@dataclass
class PendingSave:
    """A checkpoint saved locally whose upload is under way: complete once every rank has confirmed it."""

    step: int
    entry: dict[str, Any]
    upload: ckpt.BackgroundUpload


@dataclass(frozen=True)
class UploadFailure:
    """One rank's failed upload, as every rank learns it."""

    kind: str
    message: str
    retryable: bool


@dataclass(frozen=True)
class Resumed:
    """The complete checkpoint a run resumes from: its manifest, and the progress and data state saved with it."""

    step: int
    manifest: dict[str, Any]
    progress: Progress
    data_state: dict[str, Any]


class CheckpointManager:
    """Saves, completes and resumes the run's checkpoints; every method is called on every rank at the same point."""

    def __init__(self, ctx: RankContext, guard: Guard, stream: DataStream) -> None:
        self.ctx = ctx
        self.guard = guard
        self.stream = stream
        self.pending: PendingSave | None = None
        self.retention_thread: threading.Thread | None = None

    @property
    def output_is_local(self) -> bool:
        """True when checkpoints are written straight into the output (nothing to upload)."""
        return storage.same_place(str(self.ctx.places.local_dir), self.ctx.places.output)

    # ---- resume ----------------------------------------------------------------------------------------------

    def find_resume(self) -> Resumed | None:
        """The newest complete checkpoint in the output (rank 0 reads, every rank gets it, or the read error), with
        this rank's files of it on local disk and its saved state read."""
        ctx = self.ctx
        found = ctx.on_main(
            "finding the checkpoint to resume from", lambda: ckpt.latest_resumable(ctx.cfg.checkpoints.output)
        )
        if found is None:
            return None
        step = int(found["step"])
        uri = ctx.places.remote(step)
        ckpt.check_world_size(found, ctx.denv.world_size, uri)
        if ctx.denv.is_main:
            log.info("resuming from %s", uri)
        tag_dir = ckpt.materialise(ctx.places, found, ranks={ctx.denv.rank})
        doc = ckpt.read_state(tag_dir)
        return Resumed(step, found, Progress.from_json(doc), doc["data"])

    def load(self, resumed: Resumed) -> None:
        """Load the engine's weights, optimizer state and this rank's RNG state from the resumed checkpoint."""
        ctx, step = self.ctx, resumed.step
        tag_dir = ctx.places.local(step)
        lora = ctx.cfg.model.technique == "lora"
        path, _ = ctx.engine.load_checkpoint(str(tag_dir), tag=f"global_step{step}", load_module_strict=not lora)
        if path is None:
            raise StorageError(f"{tag_dir}: DeepSpeed could not load the checkpoint")
        ckpt.load_rng(tag_dir, ctx.denv.rank)
        if ctx.denv.is_main:
            emit("resumed", step=step, uri=ctx.places.remote(step))

    # ---- save ------------------------------------------------------------------------------------------------

    def save(self, step: int) -> None:
        """Save the checkpoint of ``step`` to local disk (every rank) and start uploading it in the background.

        The previous save is settled first (one upload at a time), and local disk is pruned before the save. The
        checkpoint becomes complete, is reported and is emitted when every rank has confirmed its upload
        (``poll``).
        """
        ctx = self.ctx
        cfg, denv, places, progress = ctx.cfg, ctx.denv, ctx.places, ctx.progress
        self.settle()
        if not self.output_is_local:
            ckpt.prune_local(places, cfg.checkpoints.keep - 1)  # frees disk before the save; the output has them
        save_id = ctx.broadcast(ckpt.new_save_id() if denv.is_main else None)
        assert save_id is not None  # rank 0's
        ckpt.prepare_local(places, step, save_id)
        ctx.barrier()
        tag_dir = places.local(step)
        ctx.engine.save_checkpoint(
            str(tag_dir),
            tag=f"global_step{step}",
            save_latest=False,
            exclude_frozen_parameters=cfg.model.technique == "lora",
        )
        ckpt.save_rng(tag_dir, denv.rank)
        if cfg.checkpoints.export_hf and cfg.training.zero_stage == 3:
            self.export_live(tag_dir / "hf")  # every rank gathers its partitions
        entry = checkpoint_entry(step, places.remote(step), ctx.latest_eval)
        progress.guard = self.guard.to_json()

        def rank0_part() -> None:
            if cfg.checkpoints.export_hf and cfg.training.zero_stage != 3:
                self.export_live(tag_dir / "hf")  # rank 0 writes the export (and merges LoRA adapters)
            progress.last_eval = ctx.latest_eval
            state: TrainerStateDoc = {
                **progress.to_json(),
                "checkpoints": [*progress.checkpoints, entry],
                "data": self.stream.trained_state,
                "mix": self.stream.mix_report(),
            }
            ckpt.write_json(tag_dir / ckpt.STATE_FILE, state)

        ctx.on_main(f"checkpoint {ckpt.tag_for(step)}: the hf/ export and the trainer state", rank0_part)
        self.pending = PendingSave(step, entry, ckpt.BackgroundUpload(places, step, denv.rank))
        if self.output_is_local or not cfg.checkpoints.background_upload:
            self.settle()

    def export_live(self, out_dir: Path) -> None:
        """The hf/ export of the weights being trained (ZeRO-3: every rank gathers; else rank 0 writes it)."""
        ctx = self.ctx
        cfg, module = ctx.cfg, ctx.engine.module
        if cfg.training.zero_stage == 3:
            # one parameter gathered at a time, written by rank 0 into shards as they fill
            lora = cfg.model.technique == "lora"
            sharded.export_partitioned(module, out_dir, ctx.tokenizer, ctx.denv.is_main, lora=lora)
            return
        if not ctx.denv.is_main:
            return
        sd = module.state_dict()
        if cfg.model.technique == "lora":
            write_hf_folder(sd, ctx.model_dir, cfg.model, out_dir, ctx.tokenizer)  # adapters merged, no 2nd model
        else:
            save_hf(module, out_dir, ctx.tokenizer, state_dict=sd)

    # ---- completion --------------------------------------------------------------------------------------------

    def settle(self) -> None:
        """Wait for the pending save's uploads on every rank and complete it (every rank takes part)."""
        if self.pending is not None:
            self.pending.upload.wait()
            self.poll()

    def poll(self) -> None:
        """Every rank says how its upload of the pending save stands; once all are done rank 0 writes the manifest.

        A failed upload on any rank ends the run on every rank at this point, with that rank's error (nobody waits
        for a timeout). Called at steps every rank agrees on (the flush points), so its collectives line up.
        """
        ctx, pending = self.ctx, self.pending
        if pending is None:
            return
        upload, world = pending.upload, ctx.denv.world_size
        running = upload.running  # read first: once the thread has ended, its error is final
        failed_here = not running and upload.error is not None
        flags = torch.tensor([int(failed_here), int(running)], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, running = (bool(x) for x in flags.tolist())
        if failed:
            self.pending = None
            raise self._upload_failure(pending)
        if running:
            return
        self.pending = None
        gathered: list[Any] = [upload.files]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, upload.files)
        manifest = ctx.on_main(
            f"checkpoint {ckpt.tag_for(pending.step)}: the manifest", lambda: self._publish(pending, gathered)
        )
        if not ctx.denv.is_main:
            # Nodes other than rank 0's hold only their own shards; marking their copy complete lets prune work
            # there (resume still checks every file against the manifest and downloads what a node lacks).
            ckpt.write_local_manifest(ctx.places, pending.step, manifest)
        ctx.progress.checkpoints = ctx.broadcast(ctx.progress.checkpoints)
        ctx.metrics.inc(ctx.metrics.checkpoints)
        if self.output_is_local:
            ckpt.prune_local(ctx.places, ctx.cfg.checkpoints.keep)

    def _upload_failure(self, pending: PendingSave) -> StorageError:
        """The error every rank raises when some rank's upload failed: the first failing rank's, named."""
        mine = pending.upload.error
        info = (
            None
            if mine is None
            else UploadFailure(type(mine).__name__, str(mine), isinstance(mine, StorageUnavailableError))
        )
        gathered: list[Any] = [info]
        if self.ctx.denv.world_size > 1:
            gathered = [None] * self.ctx.denv.world_size
            dist.all_gather_object(gathered, info)
        rank, failure = next((r, e) for r, e in enumerate(gathered) if e is not None)
        text = (
            f"checkpoint {ckpt.tag_for(pending.step)}: upload failed on rank {rank}: {failure.kind}: {failure.message}"
        )
        return StorageUnavailableError(text) if failure.retryable else StorageError(text)

    def _publish(self, pending: PendingSave, gathered: list[Any]) -> dict[str, Any]:
        """Rank 0: write the manifest of a save every rank has uploaded, and report the checkpoint."""
        ctx = self.ctx
        cfg, places, progress = ctx.cfg, ctx.places, ctx.progress
        all_files = sorted({tuple(f) for fs in gathered for f in fs})
        meta = {
            "worldSize": ctx.denv.world_size,
            "zeroStage": cfg.training.zero_stage,
            "technique": cfg.model.technique,
            "tokens": progress.tokens,
        }
        manifest = ckpt.make_manifest(pending.step, [(p, s) for p, s in all_files], pending.entry, meta)
        ckpt.publish_manifest(places, pending.step, manifest)
        progress.checkpoints.append(pending.entry)
        seconds = pending.upload.seconds
        emit(
            "checkpoint",
            step=pending.step,
            uri=places.remote(pending.step),
            files=len(all_files),
            uploadSeconds=None if seconds is None else round(seconds, 3),
        )
        if ctx.reporter is not None:
            ctx.report(**checkpoint_status(progress.checkpoints))
        self._start_retention()
        return manifest

    # ---- output retention ----------------------------------------------------------------------------------------

    def _start_retention(self) -> None:
        """Rank 0: a retention pass over the output in the background, after a save became complete."""
        if self.ctx.cfg.checkpoints.output_retention == "keepAll" or self.output_is_local:
            return
        if self.retention_thread is not None and self.retention_thread.is_alive():
            return  # the next completed save starts another pass
        self.retention_thread = threading.Thread(target=self._retention_pass, name="forge-retention", daemon=True)
        self.retention_thread.start()

    def _retention_pass(self) -> None:
        cfg = self.ctx.cfg
        try:
            chosen: list[str] = []
            if cfg.report.forge_job is not None:
                chosen = chosen_uris(kube_status_reader(cfg.report.forge_job)())
            settings = cfg.checkpoints
            for slimmed in retention.apply_retention(settings.output, settings.keep_resumable, chosen):
                emit("retention", step=slimmed.step, droppedFiles=slimmed.files, droppedBytes=slimmed.bytes)
        except Exception as err:  # retention saves space; it must never end the run. The next pass tries again.
            log.warning("output retention pass skipped: %s: %s", type(err).__name__, err)

    def join_retention(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a retention pass under way (at the end of the process)."""
        if self.retention_thread is not None:
            self.retention_thread.join(timeout_s)


def write_stop_marker(cfg: TrainerConfig, verdict: Verdict) -> None:
    """Record the stop next to the checkpoints: a restarted pod must not train again."""
    doc = {"version": 1, "earlyStop": verdict.status()}
    storage.write_bytes(storage.join(cfg.checkpoints.output, STOP_MARKER), json.dumps(doc).encode())


def read_stop_marker(cfg: TrainerConfig) -> dict[str, Any] | None:
    """The earlier stop of this run (same output), if any."""
    return ckpt.read_json_object(storage.join(cfg.checkpoints.output, STOP_MARKER), STOP_MARKER)
