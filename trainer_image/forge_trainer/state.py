"""The run state saved with every checkpoint, and the fixed-shape documents that travel with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

from forge_trainer.data.mixer import MixReport
from forge_trainer.evaluate import EvalResult


class RebalanceRecord(TypedDict):
    """A guard rebalance: the event, status.rebalance and the saved state carry it as is."""

    step: int
    domainPercent: int
    previousDomainPercent: int
    reason: str


class ProgressDoc(TypedDict):
    """Progress in JSON (state.json of a checkpoint)."""

    step: int
    tokens: int
    baseline: dict[str, Any] | None
    lastEval: dict[str, Any] | None
    checkpoints: list[dict[str, Any]]
    guard: dict[str, Any] | None
    domainPercent: int | None
    rebalance: RebalanceRecord | None
    lrMultiplier: float | None


class TrainerStateDoc(ProgressDoc):
    """A checkpoint's state.json: the progress, the data state to resume the stream from, and the realised mix."""

    data: dict[str, Any] | None
    mix: MixReport | None


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
    rebalance: RebalanceRecord | None = None
    lr_multiplier: float | None = None  # the learning-rate probe's choice (None: no probe)

    def to_json(self) -> ProgressDoc:
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
