"""Pure helpers: restart policy, replicas and ranks of a PyTorchJob spec."""

from __future__ import annotations

from typing import Any

import pytest

from forge_dev.standin.policy import (
    backoff_exhausted,
    container_exit_code,
    is_retryable,
    past_active_deadline,
    restart_delay,
)
from forge_dev.standin.spec import (
    JobSpecError,
    ReplicaId,
    nproc_per_node,
    parse_job,
    pod_labels,
    replica_ids,
    service_account_name,
    world_size,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("policy", "code", "retry"),
    [
        ("OnFailure", 1, True),
        ("OnFailure", 0, False),
        ("Always", 2, True),
        ("ExitCode", 1, False),
        ("ExitCode", 127, False),
        ("ExitCode", 137, True),
        ("Never", 137, False),
    ],
)
def test_is_retryable(policy: str, code: int, retry: bool) -> None:
    assert is_retryable(policy, code) is retry


def test_backoff_limit_counts_restarts() -> None:
    assert not backoff_exhausted(0, 1)
    assert backoff_exhausted(1, 1)
    assert backoff_exhausted(0, 0)
    assert not backoff_exhausted(1000, None)


def test_restart_delay_doubles_and_is_capped() -> None:
    assert [restart_delay(n, 0.5, 3.0) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_exit_codes_and_deadline() -> None:
    assert container_exit_code(-9) == 137
    assert container_exit_code(3) == 3
    assert past_active_deadline(10.0, 10)
    assert not past_active_deadline(9.9, 10)
    assert not past_active_deadline(1e9, None)


def _job(**spec: Any) -> dict[str, Any]:
    template = {"spec": {"containers": [{"name": "pytorch", "image": "i", "command": ["x"]}]}}
    replicas = spec.pop("replicas", {"Master": 1, "Worker": 2})
    return {
        "metadata": {"name": "j", "namespace": "n", "uid": "u"},
        "spec": {
            "pytorchReplicaSpecs": {rtype: {"replicas": n, "template": template} for rtype, n in replicas.items()},
            **spec,
        },
    }


def test_replicas_master_first_then_workers() -> None:
    job = parse_job(_job())
    assert [(r.name, r.node_rank) for r in replica_ids(job.spec)] == [("master-0", 0), ("worker-0", 1), ("worker-1", 2)]
    assert world_size(job.spec) == 3
    assert replica_ids(job.spec)[2].pod_name("j") == "j-worker-1"


def test_workers_only_job_ranks_from_worker_0() -> None:
    job = parse_job(_job(replicas={"Worker": 2}))
    assert [(r.name, r.node_rank) for r in replica_ids(job.spec)] == [("worker-0", 0), ("worker-1", 1)]


@pytest.mark.parametrize(("value", "nproc"), [(None, 1), ("auto", 1), ("gpu", 1), ("1", 1), ("4", 4)])
def test_nproc_per_node(value: str | None, nproc: int) -> None:
    job = parse_job(_job(nprocPerNode=value) if value else _job())
    assert nproc_per_node(job.spec) == nproc
    assert world_size(job.spec) == 3 * nproc


def test_invalid_jobs_are_reported() -> None:
    bad = _job()
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "main"
    with pytest.raises(JobSpecError, match="no container named 'pytorch'"):
        parse_job(bad)
    with pytest.raises(JobSpecError, match="unknown replica types"):
        parse_job(_job(replicas={"Chief": 1}))


def test_service_account_default_and_pod_labels() -> None:
    job = parse_job(_job())
    assert service_account_name(job.spec.pytorch_replica_specs["Master"]) == "default"
    labels = pod_labels("j", ReplicaId("Master", 0, 0), {"app": "forge"})
    assert labels["app"] == "forge"
    assert labels["training.kubeflow.org/replica-type"] == "master"
    assert labels["training.kubeflow.org/job-role"] == "master"
    assert "training.kubeflow.org/job-role" not in pod_labels("j", ReplicaId("Worker", 0, 1), {})
