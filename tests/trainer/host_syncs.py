"""Host syncs per training step, counted inside a rank process.

A host sync is the host waiting for a value computed on the device: ``item()``, ``float()``, ``int()``, ``bool()`` of
a tensor (each one dispatches ``aten::_local_scalar_dense``, counted by a dispatch mode) and ``tolist()`` (counted by
wrapping it). Collectives (``c10d::*``) are counted too. Dispatch modes are per thread: the data thread is not counted.

The Forge rank (``python -m tests.trainer.host_syncs CONFIG OUT``) wraps ``forge_trainer.loop.train_step``: what
happens inside a call is the engine's part of one step (DeepSpeed's own syncs, the same in a bare loop); what happens
after it, until the next call, is the loop's own bookkeeping for that step (logging, the guard, reports). Rank 0
writes one record per step to OUT (JSON).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SyncCounter(TorchDispatchMode):
    """Counts host reads and collectives dispatched on the thread that entered it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.collectives = 0
        # FORGE_SYNC_TRACE=1: where each host read comes from (file:line of the innermost non-torch frames), to stderr
        self.trace = os.environ.get("FORGE_SYNC_TRACE") == "1"

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
            if self.trace:
                where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in traceback.extract_stack()]
                outside = [w for w in where if not w.startswith(("torch/", "/usr/lib"))][-4:-1]
                print("host read:", " < ".join(reversed(outside)), file=sys.stderr)
        elif func.name().startswith("c10d::"):
            self.collectives += 1
        return func(*args, **(kwargs or {}))

    def snapshot(self) -> tuple[int, int]:
        return self.reads, self.collectives


def count_tolist(counter: SyncCounter) -> Callable[[], None]:
    """Count ``Tensor.tolist`` calls as host reads (on CPU they dispatch nothing); returns the undo."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        counter.reads += 1
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]

    def undo() -> None:
        torch.Tensor.tolist = original  # type: ignore[method-assign]

    return undo


@dataclass
class StepSyncs:
    """One training step's host reads and collectives: inside the engine step, and in the loop after it."""

    step: int
    engine_reads: int = 0
    engine_collectives: int = 0
    loop_reads: int = 0
    loop_collectives: int = 0


def run_forge_rank(config: str, out: Path) -> int:
    """Run the Forge trainer in this process with the counters on; rank 0 writes the per-step records."""
    from forge_trainer import loop, train

    counter = SyncCounter()
    records: list[StepSyncs] = []
    last = [(0, 0)]
    inner = loop.train_step

    def counted_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        now = counter.snapshot()
        if records:
            records[-1].loop_reads = now[0] - last[0][0]
            records[-1].loop_collectives = now[1] - last[0][1]
        result = inner(*args, **kwargs)
        after = counter.snapshot()
        records.append(StepSyncs(len(records) + 1, after[0] - now[0], after[1] - now[1]))
        last[0] = after
        return result

    loop.train_step = counted_step
    undo = count_tolist(counter)
    try:
        with counter:
            code = train.main(["--config", config])
            end = counter.snapshot()
    finally:
        undo()
    if records:
        records[-1].loop_reads = end[0] - last[0][0]
        records[-1].loop_collectives = end[1] - last[0][1]
    if os.environ.get("RANK", "0") == "0":
        out.write_text(json.dumps([asdict(r) for r in records]))
    return code


def run_counted_ranks(argv: list[str], world_size: int, workdir: Path, timeout: float = 600) -> None:
    """Run ``python argv`` as ``world_size`` rank processes (repository on the path) and wait; raise on failure."""
    import subprocess

    from tests.trainer.harness import REPO_ROOT, base_env, free_port

    port = free_port()
    procs = []
    workdir.mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        env = base_env({"PYTHONPATH": f"{REPO_ROOT}:{os.environ.get('PYTHONPATH', '')}"})
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
        with open(workdir / f"rank{rank}.out", "w") as out, open(workdir / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO_ROOT, stdout=out, stderr=err))
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        tails = "\n".join(
            f"--- rank {i} ---\n{(workdir / f'rank{i}.err').read_text()[-3000:]}" for i in range(world_size)
        )
        raise RuntimeError(f"{argv[:2]} failed: {codes}\n{tails}")


def forge_step_syncs(config: Path, world_size: int, workdir: Path) -> list[dict[str, int]]:
    """Per-step host reads and collectives of rank 0 of a Forge run of ``config`` (see the module docstring)."""
    out = workdir / "syncs.json"
    run_counted_ranks(["-m", "tests.trainer.host_syncs", str(config), str(out)], world_size, workdir)
    records: list[dict[str, int]] = json.loads(out.read_text())
    return records


if __name__ == "__main__":
    sys.exit(run_forge_rank(sys.argv[1], Path(sys.argv[2])))
