"""Helpers for the trainer tests: configs, a moto S3 server, and ranks as local processes with Kubeflow's env."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TORCH_EXTENSIONS_DIR = Path(
    os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "forge" / "torch_extensions"))
)

# Variables of an outer distributed launch that must not leak into the ranks started here.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KUBECONFIG")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for trainer processes: one torch thread per rank (2 cores), cached DeepSpeed ops."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    env.update(
        TORCH_EXTENSIONS_DIR=str(TORCH_EXTENSIONS_DIR),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        FORGE_DIST_TIMEOUT_S="120",
        FORGE_REPORT_FLUSH_S="10",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    env.update(extra or {})
    return env


def run_export(
    config: Path, checkpoint: str, out: Path, extra_env: dict[str, str] | None = None, timeout: float = 200
) -> subprocess.CompletedProcess[str]:
    """`forge-trainer export` of one checkpoint into ``out`` (the command users run), as a process."""
    argv = [str(VENV_BIN / "forge-trainer"), "export", "--config", str(config), "--checkpoint", checkpoint]
    return subprocess.run(
        [*argv, "--out", str(out)], env=base_env(extra_env), capture_output=True, text=True, timeout=timeout
    )


def merged(base: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Deep-merge dict overrides into a copy of a config."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], **value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write a trainer config JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """The structured events a rank printed (JSON lines with an 'event' key)."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and "event" in doc:
                out.append(doc)
    return out


def step_losses(events: list[dict[str, Any]]) -> dict[int, float]:
    """Per-step training loss from rank 0's events."""
    return {int(e["step"]): float(e["loss"]) for e in events if e["event"] == "step"}


@dataclass
class RankResult:
    """What one rank process did."""

    rank: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return parse_events(self.stdout)

    def describe(self) -> str:
        return f"rank {self.rank} rc={self.returncode}\n--- stderr tail ---\n{self.stderr[-4000:]}"


@dataclass
class Ranks:
    """Rank processes started with the environment Kubeflow's training-operator injects into each pod."""

    procs: list[subprocess.Popen[str]]
    logs: list[Path]
    results: list[RankResult] = field(default_factory=list)

    def wait(self, timeout: float) -> list[RankResult]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(max(0.1, deadline - time.monotonic()))
        finally:
            self.kill()
        return self.collect()

    def collect(self) -> list[RankResult]:
        self.results = []
        for i, (p, log) in enumerate(zip(self.procs, self.logs, strict=True)):
            out = log.with_suffix(".out").read_text() if log.with_suffix(".out").exists() else ""
            err = log.with_suffix(".err").read_text() if log.with_suffix(".err").exists() else ""
            self.results.append(RankResult(i, p.returncode if p.returncode is not None else -999, out, err))
        return self.results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def rank0_stdout(self) -> str:
        path = self.logs[0].with_suffix(".out")
        return path.read_text() if path.exists() else ""

    def wait_for_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """Poll rank 0's output until an event matches; fails if the ranks end first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in parse_events(self.rank0_stdout()):
                if pred(ev):
                    return ev
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        self.kill()
        details = "\n".join(r.describe() for r in self.collect())
        raise AssertionError(f"event not seen within {timeout}s\n{details}")


def start_ranks(
    config: Path,
    world_size: int,
    workdir: Path,
    env: dict[str, str] | None = None,
    nproc_per_node: int = 1,
    env_of_pod: dict[int, dict[str, str]] | None = None,
) -> Ranks:
    """One process per pod, as a PyTorchJob's pods: MASTER_ADDR/PORT, WORLD_SIZE, RANK (+ PET_*), no LOCAL_RANK.

    ``env_of_pod`` adds variables to single pods (e.g. one pod's own route to storage, for fault drills)."""
    port = free_port()
    pods = world_size // nproc_per_node
    procs, logs = [], []
    workdir.mkdir(parents=True, exist_ok=True)
    for pod in range(pods):
        pod_env = base_env(env)
        pod_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world_size),
            RANK=str(pod),
            PET_NNODES=str(pods),
            PET_NODE_RANK=str(pod),
            PET_NPROC_PER_NODE=str(nproc_per_node),
        )
        pod_env.update((env_of_pod or {}).get(pod, {}))
        log = workdir / f"rank{pod}"
        with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
            procs.append(
                subprocess.Popen(
                    [str(VENV_BIN / "forge-trainer"), "--config", str(config)],
                    env=pod_env,
                    cwd=workdir,
                    stdout=out,
                    stderr=err,
                    text=True,
                )
            )
        logs.append(log)
    return Ranks(procs, logs)


def run_ranks(config: Path, world_size: int, workdir: Path, timeout: float = 240, **kw: Any) -> list[RankResult]:
    """Start the ranks and wait for all of them."""
    return start_ranks(config, world_size, workdir, **kw).wait(timeout)


def assert_ok(results: list[RankResult]) -> None:
    bad = [r for r in results if r.returncode != 0]
    assert not bad, "\n".join(r.describe() for r in bad)


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on loopback."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "forge-test",
            "AWS_SECRET_ACCESS_KEY": "forge-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """Start `moto_server` and wait until it answers."""
    import urllib.request

    port = free_port()
    exe = VENV_BIN / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (rc={proc.poll()})") from None
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
