"""What every part of one rank's run shares: settings, the rank's place, metrics, rank-0 phases, status reports, the
run's progress and the engine; and the collectives that keep the ranks in step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from forge_trainer import checkpoint as ckpt
from forge_trainer.config import TrainerConfig
from forge_trainer.data.loader import Layout
from forge_trainer.engine import DistEnv
from forge_trainer.evaluate import EvalResult
from forge_trainer.metrics import TrainerMetrics
from forge_trainer.phases import RankZeroPhases
from forge_trainer.report import StatusReporter, phase_status, status_patch
from forge_trainer.state import Progress

T = TypeVar("T")


@dataclass
class RankContext:
    """One rank's shared run context. ``cfg`` may be replaced once (the learning-rate probe scales the rates), so
    components read it from here rather than keeping their own copy."""

    cfg: TrainerConfig
    denv: DistEnv
    places: ckpt.Places
    layout: Layout
    metrics: TrainerMetrics
    progress: Progress = field(default_factory=Progress)
    latest_eval: EvalResult | None = None
    phases: RankZeroPhases | None = None  # once the process group is up
    reporter: StatusReporter | None = None  # rank 0 of a job with a ForgeJob to report to
    engine: Any = None  # the DeepSpeed engine, once built
    model_dir: Path = field(default_factory=Path)  # the base model on local disk
    tokenizer: Any = None

    @property
    def step_tokens(self) -> int:
        """Global tokens per optimizer step."""
        return self.layout.step_sequences * self.cfg.data.seq_length

    def report(self, **fields: Any) -> None:
        """Submit a status patch of ``fields`` (rank 0 of a reporting job; elsewhere nothing)."""
        if self.reporter is not None:
            self.reporter.submit(status_patch(**fields))

    def report_phase(self, phase: str) -> None:
        """A phase other than train begins (rank 0): reported within a second, for the operator's stall check."""
        self.report(progress=phase_status(phase))

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        if self.denv.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.denv.world_size > 1:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank."""
        if self.denv.world_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def on_main(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand every rank its result, or its error, raised on every rank at once; the
        others wait under the rank-0 phase timeout (phases.py), not the training collectives'."""
        assert self.phases is not None, "the process group is not up yet"
        return self.phases.run(what, fn)
