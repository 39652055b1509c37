"""Pure helpers: finding and following a replica's log."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from forge_dev.standin.logs import (
    LogNotFoundError,
    copy_log,
    find_job_dir,
    replica_finished,
    replica_log,
    write_state,
)

pytestmark = pytest.mark.timeout(30)


def test_find_job_dir_and_default_replica(tmp_path: Path) -> None:
    (tmp_path / "ns1/job").mkdir(parents=True)
    (tmp_path / "ns1/job/worker-0.log").write_text("w\n")
    (tmp_path / "ns1/job/master-0.log").write_text("m\n")
    folder = find_job_dir(tmp_path, "job", None)
    assert folder == tmp_path / "ns1/job"
    assert replica_log(folder, None).name == "master-0.log"
    assert replica_log(folder, "worker-0").name == "worker-0.log"
    with pytest.raises(LogNotFoundError, match="replicas with logs: master-0, worker-0"):
        replica_log(folder, "worker-9")


def test_ambiguous_or_missing_jobs(tmp_path: Path) -> None:
    (tmp_path / "a/job").mkdir(parents=True)
    (tmp_path / "b/job").mkdir(parents=True)
    with pytest.raises(LogNotFoundError, match="several namespaces"):
        find_job_dir(tmp_path, "job", None)
    assert find_job_dir(tmp_path, "job", "b") == tmp_path / "b/job"
    with pytest.raises(LogNotFoundError, match="no stand-in files"):
        find_job_dir(tmp_path, "other", None)


def test_follow_stops_once_the_replica_is_finished(tmp_path: Path) -> None:
    log = tmp_path / "master-0.log"
    log.write_text("line 1\n")
    state = tmp_path / "state.json"
    write_state(state, {"replicas": {"master-0": {"state": "Running"}}})
    checks: list[bool] = []

    def finished() -> bool:
        if not checks:  # the replica writes one more line, then ends
            with log.open("a") as handle:
                handle.write("line 2\n")
            write_state(state, {"replicas": {"master-0": {"state": "Succeeded"}}})
        checks.append(replica_finished(state, "master-0"))
        return checks[-1]

    out = io.StringIO()
    copy_log(log, out, follow=True, finished=finished, poll_s=0.01)
    assert out.getvalue() == "line 1\nline 2\n"
    assert checks[-1] is True
