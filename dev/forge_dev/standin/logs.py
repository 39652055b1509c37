"""Where the stand-in keeps a job's files, and reading a replica's log (``forge-dev logs``).

Layout under the work directory::

    <workdir>/<namespace>/<job>/<replica>.log     stdout+stderr of every process of the replica, every attempt
    <workdir>/<namespace>/<job>/<replica>/         the replica's folder: volumes/, kubeconfig, working directory
    <workdir>/<namespace>/<job>/state.json         the stand-in's view of the replicas (state, pids, exit codes)
    <workdir>/<namespace>/pvc/<claim>/             persistentVolumeClaim volumes
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from forge_dev.controlplane import cache_dir

TERMINAL_STATES = frozenset({"Succeeded", "Failed", "Stopped"})


def default_workdir() -> Path:
    """``$FORGE_STANDIN_WORKDIR``, else ``<forge cache>/standin`` (``~/.cache/forge/standin``)."""
    configured = os.environ.get("FORGE_STANDIN_WORKDIR")
    return Path(configured) if configured else cache_dir() / "standin"


def job_dir(workdir: Path, namespace: str, job: str) -> Path:
    return workdir / namespace / job


def log_path(workdir: Path, namespace: str, job: str, replica: str) -> Path:
    return job_dir(workdir, namespace, job) / f"{replica}.log"


def state_path(workdir: Path, namespace: str, job: str) -> Path:
    return job_dir(workdir, namespace, job) / "state.json"


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace a job's state.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state, indent=2, sort_keys=True))
    temporary.replace(path)


def read_state(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


class LogNotFoundError(LookupError):
    """No log for that job / replica (the message lists what exists)."""


def find_job_dir(workdir: Path, job: str, namespace: str | None) -> Path:
    """The folder of ``job``: in ``namespace``, or the only namespace that has such a job."""
    if namespace is not None:
        candidates = [job_dir(workdir, namespace, job)]
    else:
        candidates = sorted(path for path in workdir.glob(f"*/{job}") if path.is_dir())
    existing = [path for path in candidates if path.is_dir()]
    if not existing:
        where = f"namespace {namespace}" if namespace else "any namespace"
        raise LogNotFoundError(f"no stand-in files for job {job!r} in {where} under {workdir}")
    if len(existing) > 1:
        namespaces = ", ".join(path.parent.name for path in existing)
        raise LogNotFoundError(f"job {job!r} exists in several namespaces ({namespaces}): pass --namespace")
    return existing[0]


def replica_log(folder: Path, replica: str | None) -> Path:
    """The log of ``replica`` (default: ``master-0``, else the first replica with a log)."""
    logs = sorted(folder.glob("*.log"))
    names = [path.stem for path in logs]
    if replica is None:
        replica = "master-0" if "master-0" in names else (names[0] if names else "master-0")
    path = folder / f"{replica}.log"
    if not path.is_file():
        known = ", ".join(names) or "-"
        raise LogNotFoundError(f"no log for replica {replica!r} in {folder}; replicas with logs: {known}")
    return path


def replica_finished(state_file: Path, replica: str) -> bool:
    """Whether state.json says ``replica`` is done (or the job's entry is gone)."""
    state = read_state(state_file)
    if not state:
        return False
    entry = state.get("replicas", {}).get(replica)
    return entry is None or entry.get("state") in TERMINAL_STATES


def copy_log(
    path: Path,
    out: IO[str],
    follow: bool,
    finished: Callable[[], bool] = lambda: False,
    poll_s: float = 0.25,
) -> None:
    """Write the log to ``out``; with ``follow``, keep writing new lines until ``finished()`` (or Ctrl-C)."""
    with path.open(errors="replace") as log:
        while True:
            chunk = log.read()
            if chunk:
                out.write(chunk)
                out.flush()
            if not follow:
                return
            if not chunk:
                if finished():
                    rest = log.read()
                    if rest:
                        out.write(rest)
                        out.flush()
                    return
                time.sleep(poll_s)


def show_logs(workdir: Path, job: str, namespace: str | None, replica: str | None, follow: bool) -> int:
    """The ``logs`` command: 0 on success, 1 (with a message on stderr) when there is no such log."""
    try:
        folder = find_job_dir(workdir, job, namespace)
        path = replica_log(folder, replica)
    except LogNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    state_file = folder / "state.json"
    with contextlib.suppress(KeyboardInterrupt):
        copy_log(path, sys.stdout, follow, finished=lambda: replica_finished(state_file, path.stem))
    return 0
