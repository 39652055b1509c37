"""Carrying out the guard's verdicts (guard.py decides them): warn, rebalance the mix, or stop the run early."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from forge_trainer.candidate_builder import CandidateBuilder
from forge_trainer.checkpoint_manager import CheckpointManager, write_stop_marker
from forge_trainer.context import RankContext
from forge_trainer.data_stream import DataStream
from forge_trainer.errors import EarlyStopError
from forge_trainer.events import emit
from forge_trainer.guard import Guard, Verdict
from forge_trainer.state import RebalanceRecord

log = logging.getLogger(__name__)


class GuardActions:
    """Acts on a verdict: every rank, the same verdict, at the same step."""

    def __init__(
        self,
        ctx: RankContext,
        guard: Guard,
        stream: DataStream,
        checkpoints: CheckpointManager,
        candidates: CandidateBuilder,
    ) -> None:
        self.ctx = ctx
        self.guard = guard
        self.stream = stream
        self.checkpoints = checkpoints
        self.candidates = candidates

    def act(self, verdict: Verdict, saved: bool) -> None:
        """Carry out a guard verdict (every rank, the same verdict)."""
        ctx = self.ctx
        if verdict.action == "rebalance" and ctx.progress.step >= ctx.cfg.training.max_steps:
            verdict = dataclasses.replace(verdict, action="warn")  # nothing left to rebalance
        ctx.metrics.inc(ctx.metrics.guard_verdicts, reason=verdict.reason)
        if ctx.denv.is_main:
            emit("guard", **verdict.status())
            log.warning("guard: %s (%s): %s", verdict.reason, verdict.action, verdict.message)
        patch: dict[str, Any] = {"earlyStop": verdict.status()}
        if verdict.action == "rebalance" and verdict.domain_percent is not None:
            patch["rebalance"] = self._rebalance(verdict)
        ctx.report(**patch)
        if verdict.action != "stop":
            return
        if not saved and verdict.reason != "NonFiniteLoss":
            self.checkpoints.save(ctx.progress.step)
        self.checkpoints.settle()
        ctx.on_main("writing the early-stop marker", lambda: write_stop_marker(ctx.cfg, verdict))
        if verdict.reason != "NonFiniteLoss":
            self.candidates.build_all()
        raise EarlyStopError(f"stopped by the guard at step {verdict.step}: {verdict.reason}: {verdict.message}")

    def _rebalance(self, verdict: Verdict) -> RebalanceRecord:
        """Raise the general share for the rest of the run: a new plan and mixer from the current data state."""
        assert verdict.domain_percent is not None
        progress = self.ctx.progress
        previous = self.guard.domain_percent
        new_dp = verdict.domain_percent
        self.stream.rebalance(new_dp, progress.step)
        self.guard.rebalanced(new_dp)
        progress.domain_percent = new_dp
        progress.rebalance = {
            "step": progress.step,
            "domainPercent": new_dp,
            "previousDomainPercent": previous,
            "reason": f"{verdict.reason}: {verdict.message}",
        }
        if self.ctx.denv.is_main:
            emit("rebalance", **progress.rebalance)
        return progress.rebalance
