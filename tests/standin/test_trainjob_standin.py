"""The stand-in as Kubeflow Trainer v2: a TrainJob on the torch-distributed ClusterTrainingRuntime runs its nodes
as local processes (torchrun, started by the runtime's PET_* variables) and gets the TrainJob status Trainer writes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from forge_dev.standin.spec import DEFAULT_CONTAINER_NAME
from forge_dev.standin.status import Observation, Outcome, ReplicaCounts
from forge_dev.standin.trainjob import as_pytorchjob, next_status, node_template, torch_environment
from tests.standin.conftest import Harness, conditions, probe_command, wait_until

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME: dict[str, Any] = {
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": "node",
                        "template": {
                            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                            "spec": {
                                "template": {
                                    "spec": {
                                        "containers": [
                                            {"name": "node", "image": "pytorch", "env": [{"name": "A", "value": "1"}]}
                                        ]
                                    }
                                }
                            },
                        },
                    }
                ]
            }
        },
    }
}


def trainjob(name: str, command: list[str], nodes: int = 2, **spec: Any) -> dict[str, Any]:
    patch = {
        "manager": "forge.dev/forge-operator",
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "template": {
                                "spec": {
                                    "template": {
                                        "metadata": {"labels": {"team": "nlp"}},
                                        "spec": {
                                            "volumes": [{"name": "scratch", "emptyDir": {}}],
                                            "containers": [
                                                {
                                                    "name": "node",
                                                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                                                }
                                            ],
                                        },
                                    }
                                }
                            },
                        }
                    ]
                }
            }
        },
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": "torch-distributed"},
            "trainer": {
                "image": "forge-trainer:dev",
                "command": command,
                "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}],
                "numNodes": nodes,
                "numProcPerNode": 1,
            },
            "runtimePatches": [patch],
            **spec,
        },
    }


# --- pure ---------------------------------------------------------------------------------------------------------


def test_the_node_template_is_the_runtimes_with_the_trainer_and_the_patches() -> None:
    template = node_template(trainjob("t", ["run"]), RUNTIME)
    (container,) = template["spec"]["containers"]
    assert container["name"] == DEFAULT_CONTAINER_NAME and container["command"] == ["run"]
    assert container["image"] == "forge-trainer:dev"
    assert container["env"] == [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]  # the TrainJob's wins
    assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/scratch"}]
    assert template["spec"]["volumes"] == [{"name": "scratch", "emptyDir": {}}]
    assert template["metadata"]["labels"] == {"team": "nlp"}  # the ancestor label is the Job template's
    job = as_pytorchjob({**trainjob("t", ["run"], nodes=3), "metadata": {"name": "t", "namespace": "n"}}, RUNTIME)
    assert job.spec.pytorch_replica_specs["Worker"].replicas == 3
    assert job.spec.run_policy.backoff_limit == 0 and job.spec.pytorch_replica_specs["Worker"].restart_policy == "Never"


def test_torch_environment_is_what_torchrun_reads() -> None:
    assert dict(torch_environment(2, 4, 1, 29400)) == {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": "29400",
    }


def test_trainjob_status_is_written_as_trainer_writes_it() -> None:
    running = Observation("t", {"Worker": ReplicaCounts(active=2)}, running=True)
    status = next_status({}, running, "t1")
    assert conditions({"status": status}) == {"Created": "True"}
    assert status["jobsStatus"] == [
        {"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}
    ]
    assert next_status(status, running, "t2") == status  # nothing changed: nothing to write
    suspended = next_status(status, Observation("t", suspended=True), "t3")
    assert conditions({"status": suspended}) == {"Created": "True", "Suspended": "True"}
    resumed = next_status(suspended, running, "t4")
    assert conditions({"status": resumed})["Suspended"] == "False"
    done = next_status(resumed, Observation("t", outcome=Outcome("Succeeded", "ok")), "t5")
    assert conditions({"status": done})["Complete"] == "True"
    failed = next_status(status, Observation("t", outcome=Outcome("Failed", "PyTorchJob t is failed")), "t6")
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "FailedJobs" and "PyTorchJob" not in condition["message"]
    assert next_status(done, running, "t7") == done  # finished: final


# --- on the local control plane -----------------------------------------------------------------------------------


def create(standin: Harness, body: dict[str, Any]) -> None:
    standin.objects.create_namespaced_custom_object(GROUP, VERSION, standin.namespace, PLURAL, body)


def get(standin: Harness, name: str) -> dict[str, Any]:
    return dict(standin.objects.get_namespaced_custom_object(GROUP, VERSION, standin.namespace, PLURAL, name))


@pytest.mark.timeout(120)
def test_a_trainjob_runs_its_nodes_through_torchrun_then_completes(standin: Harness) -> None:
    out = standin.out
    command = ["torchrun", "--no-python", *probe_command("--out", str(out), "--touch", "/scratch/x")]
    create(standin, trainjob("tj", command))
    records = {rank: standin.record(rank, timeout_s=60) for rank in (0, 1)}
    for rank, record in records.items():
        env = record["env"]
        # torchrun turned the runtime's PET_* variables into the ranks' rendezvous.
        assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1" and env["PET_NODE_RANK"] == str(rank)
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "0"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["PET_MASTER_PORT"] == records[0]["env"]["PET_MASTER_PORT"]
        assert env["A"] == "2" and env["B"] == "3"
    done = wait_until(
        lambda: (lambda j: j if conditions(j).get("Complete") == "True" else None)(get(standin, "tj")),
        "Complete",
        timeout_s=60,
    )
    assert conditions(done) == {"Created": "True", "Complete": "True"}
    assert done["status"]["jobsStatus"][0]["succeeded"] == 1


@pytest.mark.timeout(120)
def test_a_failed_node_fails_the_trainjob_and_suspend_stops_it(standin: Harness) -> None:
    out = standin.out
    create(standin, trainjob("bad", probe_command("--out", str(out), "--exit", "3"), nodes=1))

    def failed() -> dict[str, Any] | None:
        job = get(standin, "bad")
        return job if conditions(job).get("Failed") == "True" else None

    job = wait_until(failed, "Failed", timeout_s=60)
    condition = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "FailedJobs"
    assert len(standin.starts("x")) == 1  # torch-distributed restarts nothing here

    create(standin, trainjob("held", probe_command("--out", str(out / "held"), "--sleep"), nodes=1, suspend=True))
    time.sleep(1.0)  # a suspended TrainJob starts nothing (checked below after the stand-in's passes)

    def suspended() -> dict[str, Any] | None:
        job = get(standin, "held")
        return job if conditions(job).get("Suspended") == "True" else None

    wait_until(suspended, "Suspended", timeout_s=30)
    assert not (out / "held").exists()
