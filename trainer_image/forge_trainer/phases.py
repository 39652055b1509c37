"""Work that only rank 0 does while the other ranks wait: manifests, hf/ exports and LoRA merges, candidate builds
and uploads, reads of the output.

The waiting ranks wait on a gloo group of their own whose timeout is sized for that work
(``FORGE_RANK0_PHASE_TIMEOUT_S``, default 4 hours), not on the training collectives' group
(``FORGE_DIST_TIMEOUT_S``, 30 minutes): writing a 70B export takes longer than a collective should ever wait, and
on GPUs the waiting ranks hold no NCCL kernel while they wait. Rank 0's result, or its error, reaches every rank at
once; a rank that waited past the timeout fails with a DistributedError that names the phase.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from forge_trainer.errors import DistributedError, ForgeError

log = logging.getLogger(__name__)

T = TypeVar("T")

PHASE_TIMEOUT_ENV = "FORGE_RANK0_PHASE_TIMEOUT_S"
DEFAULT_PHASE_TIMEOUT_S = 4 * 3600.0


def phase_timeout_seconds(env: dict[str, str] | None = None) -> float:
    """The timeout from the environment (at least 1 s); a value that is not a number is a DistributedError."""
    raw = (os.environ if env is None else env).get(PHASE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_PHASE_TIMEOUT_S
    try:
        return max(1.0, float(raw))
    except ValueError:
        raise DistributedError(f"environment {PHASE_TIMEOUT_ENV}={raw!r}: expected seconds, e.g. 14400") from None


class RankZeroPhases:
    """Runs a function on rank 0 and hands its result (or its error) to every rank over a dedicated gloo group."""

    def __init__(self, rank: int, world_size: int, timeout_s: float | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = phase_timeout_seconds() if timeout_s is None else timeout_s
        self.group: Any = None
        if world_size > 1 and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))

    def run(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0; every rank returns its result, or raises its error (a ForgeError keeps its kind and
        exit code; any other error becomes a ForgeError naming rank 0 and the phase)."""
        outcome: tuple[bool, Any] = (True, None)
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                outcome = (True, fn())
            except Exception as err:
                failure = err
                shared = (
                    err if isinstance(err, ForgeError) else ForgeError(f"rank 0, {what}: {type(err).__name__}: {err}")
                )
                outcome = (False, shared)
        ok, value = self._share(what, outcome)
        if failure is not None:
            raise failure
        if not ok:
            raise value
        result: T = value
        return result

    def _share(self, what: str, outcome: tuple[bool, Any]) -> tuple[bool, Any]:
        if self.group is None:
            return outcome
        box = [outcome]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as err:
            if self.rank == 0:
                raise
            raise DistributedError(
                f"{what}: rank 0 did not finish within {self.timeout_s:g} s ({PHASE_TIMEOUT_ENV}) or was lost: {err}"
            ) from err
        shared: tuple[bool, Any] = box[0]
        return shared
