"""Straggler drill: two real DeepSpeed ranks (gloo, ZeRO-2); rank 1 sleeps in each step (FORGE_FAULT_SLEEP_PER_STEP).
Rank 0 names rank 1 (event ``pace``, the status.pace it reports) and rank 1's straggler gauge is 1; the same run
without the fault names no one."""

from __future__ import annotations

import http.client
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.harness import Ranks, assert_ok, free_port, merged, parse_events, start_ranks, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 30
FAULT_FROM = 3  # rank 1's first slow step
GAUGE = re.compile(r'^forge_trainer_straggler_rank\{[^}]*rank="(\d+)"[^}]*\} (\S+)$', re.M)
OWN = re.compile(r'^forge_trainer_rank_step_seconds\{[^}]*rank="(\d+)"[^}]*\} (\S+)$', re.M)


@dataclass
class Watched:
    """What the test saw while the ranks ran: rank 0's events with the time each was first seen, rank 1's scrapes."""

    seen: dict[int, float] = field(default_factory=dict)  # event index -> time.monotonic() when first read
    events: list[dict[str, Any]] = field(default_factory=list)
    scrapes: list[str] = field(default_factory=list)


def watch(ranks: Ranks, metrics_port: int, timeout: float) -> Watched:
    """Poll rank 0's events and rank 1's /metrics until the ranks end."""
    out = Watched()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in ranks.procs):
        out.events = parse_events(ranks.rank0_stdout())
        now = time.monotonic()
        for i in range(len(out.events)):
            out.seen.setdefault(i, now)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as resp:
                body = resp.read().decode()
            if body:
                out.scrapes.append(body)
        except (OSError, http.client.HTTPException):  # the rank may exit in the middle of a scrape
            pass
        time.sleep(0.05)
    out.events = parse_events(ranks.rank0_stdout())
    return out


def run(base: dict[str, Any], tmp: Path, fault: str | None) -> Watched:
    cfg = merged(
        base,
        training={"maxSteps": STEPS, "logEverySteps": 2},
        eval={"everySteps": 1000},
        checkpoints={
            "everySteps": 1000,
            "exportHf": False,
            "candidates": {"averageLast": 0, "interpolationAlphas": []},
        },
    )
    ports = {0: free_port(), 1: free_port()}
    env_of_pod: dict[int, dict[str, str]] = {
        pod: {"FORGE_METRICS_PORT": str(port), "FORGE_POD_NAME": f"drill-{pod}", "FORGE_NODE_NAME": f"node-{pod}"}
        for pod, port in ports.items()
    }
    ranks = start_ranks(
        write_config(tmp / "config.json", cfg),
        2,
        tmp / "ranks",
        env={"FORGE_FAULT_SLEEP_PER_STEP": fault} if fault else None,
        env_of_pod=env_of_pod,
    )
    watched = watch(ranks, ports[1], timeout=480)
    assert_ok(ranks.wait(timeout=60))
    return watched


def gauges(scrapes: list[str], pattern: re.Pattern[str]) -> list[dict[str, float]]:
    return [{rank: float(v) for rank, v in pattern.findall(body)} for body in scrapes]


def test_a_rank_sleeping_in_each_step_is_named_a_straggler(base_config: dict[str, Any], tmp_path: Path) -> None:
    watched = run(base_config, tmp_path, f"1:0.5:{FAULT_FROM}")
    paces = [(i, e) for i, e in enumerate(watched.events) if e["event"] == "pace"]
    named = [(i, e) for i, e in paces if e.get("straggler")]
    assert named, f"no straggler named: {paces}"
    index, event = named[0]
    straggler = event["straggler"]
    assert (straggler["rank"], straggler["pod"], straggler["node"]) == (1, "drill-1", "node-1"), event
    assert straggler["stepSeconds"] >= 0.5 > 1.3 * straggler["medianSeconds"], event
    assert straggler["readBacks"] == 5 and event["ranks"] == 2, event
    # rank 1 serves its own verdict: its straggler gauge turned 1
    assert any(g.get("1") == 1.0 for g in gauges(watched.scrapes, GAUGE)), watched.scrapes[-1:]
    assert any(g.get("1", 0) >= 0.5 for g in gauges(watched.scrapes, OWN)), watched.scrapes[-1:]
    # detection latency: from the read-back before the first slow step to the pace event
    before = next(i for i, e in enumerate(watched.events) if e["event"] == "step" and e["step"] == FAULT_FROM - 1)
    steps = event["step"] - FAULT_FROM + 1
    seconds = watched.seen[index] - watched.seen[before]
    print(f"straggler detection latency: {steps} steps, {seconds:.1f} s (named at step {event['step']})")
    assert seconds > 0
    # the slow steps dominate the 20-step median within 10 steps, then 5 read-backs of 2 steps each
    assert steps <= 10 + 5 * 2, event


def test_the_same_run_without_the_fault_names_no_one(base_config: dict[str, Any], tmp_path: Path) -> None:
    watched = run(base_config, tmp_path, None)
    paces = [e for e in watched.events if e["event"] == "pace"]
    assert paces and paces[0]["ranks"] == 2, paces  # judged from the first read-back on
    assert not [e for e in paces if e.get("straggler") or e.get("throughputDrop")], paces
    seen = gauges(watched.scrapes, GAUGE)
    assert seen and all(g.get("1") == 0.0 for g in seen if g), watched.scrapes[-1:]
    assert any(g.get("1", 0) > 0 for g in gauges(watched.scrapes, OWN)), watched.scrapes[-1:]
