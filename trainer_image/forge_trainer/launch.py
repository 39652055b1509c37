"""Several processes per pod: with PET_NPROC_PER_NODE > 1 the trainer starts one child per local rank.

The Kubeflow training-operator sets, per pod, WORLD_SIZE = pods * nprocPerNode, RANK = the pod's index (also
PET_NODE_RANK) and PET_NPROC_PER_NODE. Kubeflow Trainer v2's torch runtime sets only the PET_* variables (PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), which torchrun would read; Forge reads them
itself (``from_trainer_v2``), so that no torchrun stands between the pod and the trainer's exit code (torchrun exits
1 for any failed rank, which hides an early stop or a retryable outage from the pod's restart policy). Each child
gets LOCAL_RANK = i and RANK = node_rank * nproc + i. If any child fails, the others are stopped and the launcher
exits with the failed child's code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from forge_trainer.errors import DistributedError

log = logging.getLogger(__name__)


def from_trainer_v2(env: Mapping[str, str]) -> dict[str, str]:
    """What a Trainer v2 pod lacks that this process needs: MASTER_ADDR/MASTER_PORT from PET_MASTER_ADDR/PORT, and for
    one process per node its RANK (the node rank) and WORLD_SIZE (the nodes). Empty outside Trainer v2 (no
    PET_NODE_RANK, or RANK already set by the training-operator or a launcher)."""
    if "PET_NODE_RANK" not in env or "RANK" in env:
        return {}
    out: dict[str, str] = {}
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if f"PET_{name}" in env and name not in env:
            out[name] = env[f"PET_{name}"]
    if nproc_per_node(env) == 1:
        out.update(RANK=env["PET_NODE_RANK"], WORLD_SIZE=env.get("PET_NNODES", "1"), LOCAL_RANK="0")
    return out


def nproc_per_node(env: Mapping[str, str]) -> int:
    """Processes this pod should run (1 unless PET_NPROC_PER_NODE says more and LOCAL_RANK is not set yet)."""
    if "LOCAL_RANK" in env:
        return 1
    raw = env.get("PET_NPROC_PER_NODE", "1")
    if raw in ("auto", "gpu"):
        import torch

        return max(1, torch.cuda.device_count())
    try:
        n = int(raw)
    except ValueError:
        raise DistributedError(f"environment PET_NPROC_PER_NODE={raw!r} is not an integer") from None
    if n < 1:
        raise DistributedError(f"environment PET_NPROC_PER_NODE={n} must be >= 1")
    return n


def child_envs(env: Mapping[str, str], nproc: int) -> list[dict[str, str]]:
    """The environment of each local process."""
    node_rank = int(env.get("PET_NODE_RANK", env.get("RANK", "0")))
    nnodes = int(env.get("PET_NNODES", "0") or 0)
    world = nnodes * nproc if nnodes else int(env.get("WORLD_SIZE", str(nproc)))
    if world % nproc or not 0 <= node_rank < world // nproc:
        raise DistributedError(
            f"environment WORLD_SIZE={world} and node rank {node_rank} do not fit PET_NPROC_PER_NODE={nproc}"
        )
    out = []
    for i in range(nproc):
        child = dict(env)
        child.update(
            RANK=str(node_rank * nproc + i),
            LOCAL_RANK=str(i),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(nproc),
        )
        out.append(child)
    return out


def run_children(argv: Sequence[str], envs: list[dict[str, str]], grace_s: float = 10.0) -> int:
    """Run one child per env; return 0 if all succeed, else the first failure's exit code."""
    procs = [subprocess.Popen([sys.executable, "-m", "forge_trainer.train", *argv], env=e) for e in envs]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed:
            code = _exit_code(failed[0].returncode)
            log.error("local rank %d exited with %d: stopping the others", procs.index(failed[0]), code)
            _stop(procs, grace_s)
            return code
        time.sleep(0.2)
    for p in procs:
        if p.returncode:
            return _exit_code(p.returncode)
    return code


def _exit_code(returncode: int) -> int:
    # A child killed by a signal has returncode -N; report it as a shell would (128+N).
    return 128 - returncode if returncode < 0 else returncode


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def maybe_launch(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int | None:
    """If this pod must run several processes, run them and return the exit code; else None."""
    e = dict(os.environ if env is None else env)
    n = nproc_per_node(e)
    if n <= 1:
        return None
    log.info("starting %d local processes", n)
    return run_children(argv, child_envs(e, n))
