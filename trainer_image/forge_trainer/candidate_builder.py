"""End-of-run candidates on every rank: rank 0 builds each planned candidate (candidates.py) from the checkpoints'
hf/ exports and uploads it; every rank loads it and evaluates its share of the held-out sets; rank 0 publishes and
reports it."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forge_trainer import candidates as cand
from forge_trainer import checkpoint as ckpt
from forge_trainer import sharded, storage
from forge_trainer.context import RankContext
from forge_trainer.errors import StorageError
from forge_trainer.evaluation import Evaluator
from forge_trainer.events import emit
from forge_trainer.model import file_lock
from forge_trainer.report import checkpoint_entry, checkpoint_status

log = logging.getLogger(__name__)

Files = list[tuple[str, int]]


@dataclass(frozen=True)
class CandidateBuild:
    """Rank 0's outcome for one candidate, handed to every rank: an earlier publication of it (``reused``), the
    files it built and uploaded (``files``), or neither (it could not be built)."""

    reused: dict[str, Any] | None = None
    files: Files | None = None


class CandidateBuilder:
    """Builds, evaluates, publishes and reports the end-of-run candidates (every rank takes part)."""

    def __init__(self, ctx: RankContext, evaluator: Evaluator) -> None:
        self.ctx = ctx
        self.evaluator = evaluator

    @property
    def _inputs(self) -> Path:
        """Scratch folder for checkpoint exports downloaded to build candidates (removed afterwards)."""
        return self.ctx.places.local_dir / cand.CANDIDATES_DIR / ".inputs"

    def build_all(self) -> None:
        """Build, evaluate, publish and report the end-of-run candidates (every rank takes part).

        Rank 0 builds each candidate from the hf/ exports and uploads it; every rank loads it and evaluates its share
        of the held-out sets. A candidate that cannot be built is logged and skipped, never fatal: the run's
        checkpoints are complete already.
        """
        ctx = self.ctx
        cfg, denv = ctx.cfg, ctx.denv
        settings = cfg.checkpoints.candidates
        if settings.average_last < 2 and not settings.interpolation_alphas:
            return
        ctx.report_phase("candidates")
        if not cfg.checkpoints.export_hf or not self.evaluator.has_sets:
            if denv.is_main:
                log.warning("no end-of-run candidates: they need checkpoints.exportHf and held-out sets")
            return
        plans = ctx.on_main("listing the checkpoints for candidates", self._plans)
        try:
            for plan in plans:
                self._candidate(plan)
        finally:
            if denv.is_main:
                shutil.rmtree(self._inputs, ignore_errors=True)
        if denv.is_main and ctx.reporter is not None:
            ctx.report(**checkpoint_status(ctx.progress.checkpoints))

    def _plans(self) -> list[cand.CandidatePlan]:
        steps = [int(m["step"]) for m in ckpt.complete_checkpoints(self.ctx.cfg.checkpoints.output)]
        return cand.plan_candidates(steps, self.ctx.cfg.checkpoints.candidates)

    def _candidate(self, plan: cand.CandidatePlan) -> None:
        ctx = self.ctx
        denv = ctx.denv
        uri = cand.candidate_uri(ctx.cfg.checkpoints.output, plan)
        local_dir = ctx.places.local_dir / cand.CANDIDATES_DIR / plan.name

        def build_or_reuse() -> CandidateBuild:
            """Rank 0: reuse an earlier publication of the same candidate, or build and upload it."""
            try:
                earlier = cand.published_entry(uri)
                if earlier is not None:
                    return CandidateBuild(reused=earlier)
                return CandidateBuild(files=self._build(plan, local_dir, uri))
            except Exception as err:  # reported; the run's own checkpoints stand
                log.warning("candidate %s not built: %s: %s", plan.name, type(err).__name__, err)
                emit("candidateFailed", name=plan.name, error=f"{type(err).__name__}: {err}")
                return CandidateBuild()

        outcome = ctx.on_main(f"candidate {plan.name}: build and upload", build_or_reuse)
        if outcome.reused is not None:
            if denv.is_main:
                emit("candidateReused", name=plan.name, uri=uri)
            self._add_entry(outcome.reused)
            return
        if outcome.files is not None:
            self._evaluate(plan, uri, local_dir, outcome.files)

    def _evaluate(self, plan: cand.CandidatePlan, uri: str, local_dir: Path, files: Files) -> None:
        """Every rank: fetch and load the candidate just built, evaluate it; rank 0 publishes and reports it."""
        ctx = self.ctx
        denv = ctx.denv
        module: Any = None
        try:
            with file_lock(ctx.places.lock):
                folder = cand.fetch_files(uri, local_dir, files)
            module = self._load(folder)
            ok = True
        except Exception as err:  # every rank must agree before the collective evaluation
            log.warning("candidate %s not loaded on rank %d: %s", plan.name, denv.rank, err)
            ok = False
        try:
            if not ctx.all_ok(ok):
                return
            ev = self.evaluator.measure(plan.step, module=module)
            del module
            if ev is not None and denv.is_main:
                entry = {**checkpoint_entry(plan.step, uri, ev), **plan.status_fields()}
                cand.publish_manifest(local_dir, uri, files, entry)
                shown = {k: v for k, v in entry.items() if k not in ("uri", "complete")}
                emit("candidate", name=plan.name, uri=uri, **shown)
                self._add_entry(entry)
        finally:
            # The durable copy is in the output; a node's scratch disk keeps at most one candidate at a time.
            ctx.barrier()
            if denv.local_rank == 0:
                shutil.rmtree(local_dir, ignore_errors=True)

    def _build(self, plan: cand.CandidatePlan, local_dir: Path, uri: str) -> Files:
        tuned = [self._hf_folder(step) for step in (plan.average_of or (plan.step,))]
        if plan.kind == "average":
            weights = cand.iter_average([cand.WeightFolder(f) for f in tuned])
        else:
            assert plan.alpha is not None
            base = cand.WeightFolder(self.ctx.model_dir)
            weights = cand.iter_interpolate(base, cand.WeightFolder(tuned[-1]), plan.alpha)
        cand.write_folder(weights, tuned[-1], local_dir)  # tensor by tensor, into shards as they fill
        return cand.upload_files(local_dir, uri)

    def _hf_folder(self, step: int) -> Path:
        """The hf/ export of a complete checkpoint on local disk: the local copy, or a download into the candidates'
        scratch folder when the checkpoint was pruned locally or written by another node."""
        places = self.ctx.places
        local = places.local(step)
        if (local / ckpt.MANIFEST).is_file() and (local / ckpt.HF_DIR).is_dir():
            return local / ckpt.HF_DIR
        manifest = ckpt.read_manifest(places.remote(step))
        if manifest is None:
            raise StorageError(f"checkpoint {places.remote(step)} is not complete")
        folder = self._inputs / ckpt.tag_for(step) / ckpt.HF_DIR
        prefix = ckpt.HF_DIR + "/"
        files = [(f["path"][len(prefix) :], int(f["size"])) for f in manifest["files"] if f["path"].startswith(prefix)]
        if not files:
            raise StorageError(f"checkpoint {places.remote(step)} has no {prefix} export")
        return cand.fetch_files(storage.join(places.remote(step), ckpt.HF_DIR), folder, files)

    def _load(self, folder: Path) -> Any:
        """The module that evaluates a candidate. Under ZeRO-3 the engine's own partitioned module, each rank reading
        its own rows of the candidate into its partitions (training is over: no second model is built); otherwise
        the candidate loaded whole."""
        cfg, engine = self.ctx.cfg, self.ctx.engine
        if cfg.training.zero_stage == 3:
            sharded.load_partitions(engine.module, folder, rename=cfg.model.technique == "lora")
            return engine.module
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation=cfg.model.attention_implementation
        )
        return model.to(engine.device)

    def _add_entry(self, entry: dict[str, Any]) -> None:
        """Rank 0: ``entry`` replaces any entry of the same candidate in the run's checkpoints."""
        ctx = self.ctx
        if not ctx.denv.is_main:
            return
        key = (entry.get("kind"), entry.get("step"), entry.get("alpha"), tuple(entry.get("averageOf") or ()))
        kept = [
            e
            for e in ctx.progress.checkpoints
            if (e.get("kind"), e.get("step"), e.get("alpha"), tuple(e.get("averageOf") or ())) != key
        ]
        ctx.progress.checkpoints = [*kept, entry]
