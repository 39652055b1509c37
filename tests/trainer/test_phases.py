"""Rank-0 phases over a real gloo group of two processes: the result, rank 0's error, and a wait past the timeout."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import time
from typing import Any

import pytest
import torch.distributed as dist

from forge_trainer.errors import DistributedError, ForgeError, StorageError
from forge_trainer.phases import PHASE_TIMEOUT_ENV, RankZeroPhases, phase_timeout_seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rank_zero_work(scenario: str) -> Any:
    if scenario == "value":
        return {"step": 40, "files": ["a", "b"]}
    if scenario == "storage":
        raise StorageError("s3://bucket/out/: AccessDenied")
    if scenario == "bug":
        raise ValueError("disk full")
    time.sleep(8)  # "slow": longer than the phase timeout
    return None


def worker(rank: int, port: int, scenario: str, out: Any) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    phases = RankZeroPhases(rank, 2, timeout_s=2)
    try:
        result = phases.run("checkpoint 40: export", lambda: rank_zero_work(scenario))
        out.put((rank, "ok", result))
    except Exception as err:
        out.put((rank, type(err).__name__, str(err), getattr(err, "exit_code", None)))


def run_pair(scenario: str) -> list[tuple[Any, ...]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, scenario, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=120))
    except queue.Empty:
        pass
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return results


def test_every_rank_gets_rank_zeros_result() -> None:
    results = sorted(run_pair("value"))
    assert results == [(0, "ok", {"step": 40, "files": ["a", "b"]}), (1, "ok", {"step": 40, "files": ["a", "b"]})]


def test_rank_zeros_error_reaches_every_rank_with_its_kind() -> None:
    results = {r[0]: r for r in run_pair("storage")}
    assert set(results) == {0, 1}
    for rank in (0, 1):
        assert results[rank][1:] == ("StorageError", "s3://bucket/out/: AccessDenied", StorageError.exit_code)


def test_an_unexpected_error_reaches_the_other_ranks_naming_rank_zero_and_the_phase() -> None:
    results = {r[0]: r for r in run_pair("bug")}
    assert results[0][1:3] == ("ValueError", "disk full")
    assert results[1][1] == ForgeError.__name__
    assert results[1][2] == "rank 0, checkpoint 40: export: ValueError: disk full"


def test_a_rank_that_waits_past_the_timeout_names_the_phase() -> None:
    results = run_pair("slow")
    # The waiting rank gives up first, while rank 0 is still at work.
    first = results[0]
    assert first[0] == 1 and first[1] == DistributedError.__name__, results
    assert "checkpoint 40: export: rank 0 did not finish within 2 s" in first[2] and PHASE_TIMEOUT_ENV in first[2]
    assert first[3] == DistributedError.exit_code


def test_the_timeout_comes_from_the_environment() -> None:
    assert phase_timeout_seconds({}) == 4 * 3600
    assert phase_timeout_seconds({PHASE_TIMEOUT_ENV: "600"}) == 600
    assert phase_timeout_seconds({PHASE_TIMEOUT_ENV: "0"}) == 1
    with pytest.raises(DistributedError, match=PHASE_TIMEOUT_ENV):
        phase_timeout_seconds({PHASE_TIMEOUT_ENV: "an hour"})
