"""Local processes standing in for containers: each in its own session and process group, stopped as a group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from forge_dev.standin.policy import container_exit_code
from forge_dev.standin.status import utc_now


@dataclass
class LocalProcess:
    """One process of a replica (one local rank)."""

    popen: subprocess.Popen[bytes]
    local_rank: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exit_code(self) -> int | None:
        """The container-style exit code once the process has exited, else None."""
        returncode = self.popen.poll()
        return None if returncode is None else container_exit_code(returncode)


def log_line(log_path: Path, text: str) -> None:
    """Append one stand-in line (prefixed ``[forge-standin <time>]``) to a replica's log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"[forge-standin {utc_now()}] {text}\n")


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path, local_rank: int) -> LocalProcess:
    """Start ``argv`` in a new session (its own process group), stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LocalProcess(popen, local_rank)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid`` (a no-op when the group is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still alive (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_processes(processes: Iterable[LocalProcess], grace_s: float) -> None:
    """Stop every process and its whole group: SIGTERM, wait up to ``grace_s``, then SIGKILL; reap them."""
    procs = list(processes)
    for proc in procs:
        signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        sweep(proc)


def sweep(proc: LocalProcess) -> None:
    """Kill whatever is left of a process's group (children it started) and reap the process itself."""
    signal_group(proc.pid, signal.SIGKILL)
    proc.popen.wait()
