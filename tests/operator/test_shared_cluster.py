"""The operator on a shared cluster, against the real local control plane: a finished run never starts again (TTL
clean-up while the operator is down), Kueue's hold on a queued run (done to the PyTorchJob here as Kueue does it),
and the periodic resync that repairs what events missed."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LocalCluster
from tests.operator.conftest import OPERATOR_DEFAULTS
from tests.operator.helpers import Kube, OperatorProcess, TrainingOperatorStatus, forgejob, wait_for

FINALIZER = "forge.dev/final-status"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Node labels of a Kueue ResourceFlavor, injected into every pod template at admission.
FLAVOR = {"cloud.example/gpu-pool": "h100-spot"}


@pytest.fixture(scope="module")
def operator_process(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator with a 1 s resync, so that tests can wait for resyncs to have happened."""
    log_path: Path = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(
        cluster.kubeconfig, log_path, extra_env={**OPERATOR_DEFAULTS, "FORGE_RESYNC_SECONDS": "1"}
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def resync_count(operator: OperatorProcess) -> float:
    match = re.search(r'^forge_reconcile_duration_seconds_count\{handler="resync"\} (\S+)$', operator.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def after_resyncs(kube: Kube, operator: OperatorProcess, count: int = 3) -> None:
    """Wait until the operator has run about ``count`` resync rounds: a state that survives them is one the resync
    leaves alone. Each ForgeJob has its own timer (one run per second here), so a round is one run per ForgeJob."""
    alive = len(kube.custom.list_cluster_custom_object("forge.dev", "v1alpha1", "forgejobs")["items"])
    target = resync_count(operator) + count * max(alive, 1)
    wait_for(lambda: resync_count(operator) >= target, timeout=60, what=f"{count} resync rounds")


def condition_of(kube: Kube, namespace: str, name: str, condition_type: str) -> dict[str, Any]:
    return kube.condition(namespace, name, condition_type) or {}


def wait_value(probe: Callable[[], Any], expected: Any, what: str, operator: OperatorProcess) -> None:
    wait_for(lambda: probe() == expected, what=f"{what} == {expected!r}", context=operator.log_tail)


def run_policy(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    job = kube.pytorchjob(namespace, name)
    assert job is not None, f"PyTorchJob {name} is missing"
    result: dict[str, Any] = job["spec"]["runPolicy"]
    return result


def patch_pytorchjob(kube: Kube, namespace: str, name: str, patch: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name, patch)


def node_selectors(kube: Kube, namespace: str, name: str) -> list[Any]:
    job = kube.pytorchjob(namespace, name) or {}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    return [replicas[kind]["template"]["spec"].get("nodeSelector") for kind in sorted(replicas)]


# --- a finished run never starts again --------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["Succeeded", "Failed"])
def test_ttl_clean_up_while_the_operator_is_down_never_restarts_the_run(
    outcome: str, kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    name = f"ttl-{outcome.lower()}"
    kube.create_forgejob(namespace, forgejob(name, runPolicy={"ttlSecondsAfterFinished": 0, "backoffLimit": 0}))
    job = wait_for(lambda: kube.pytorchjob(namespace, name), what="PyTorchJob", context=operator_process.log_tail)
    assert job["metadata"]["finalizers"] == [FINALIZER]
    first_uid = job["metadata"]["uid"]
    trainer_op = TrainingOperatorStatus(kube, namespace, name)
    trainer_op.created()
    trainer_op.running()
    wait_value(lambda: kube.state(namespace, name), "Running", "state", operator_process)

    operator_process.stop()
    # While the operator is down the run ends (backoffLimit 0 is exhausted for Failed) and the training operator's
    # TTL clean-up deletes the PyTorchJob: the finalizer keeps it, with its final conditions, until the operator
    # has read them.
    if outcome == "Succeeded":
        trainer_op.succeeded()
    else:
        trainer_op.failed()
    kube.custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name)
    held = kube.pytorchjob(namespace, name)
    assert held is not None and held["metadata"].get("deletionTimestamp"), "the finalizer holds the deleted job"
    assert kube.state(namespace, name) == "Running"

    operator_process.start()

    wait_value(lambda: kube.state(namespace, name), outcome, "state", operator_process)
    wait_for(lambda: kube.pytorchjob(namespace, name) is None, what="the finalizer released", timeout=30)
    after_resyncs(kube, operator_process)
    assert kube.pytorchjob(namespace, name) is None, "a finished run was started again"
    assert kube.state(namespace, name) == outcome
    final = condition_of(kube, namespace, name, outcome)
    assert final.get("status") == "True" and final.get("reason") == f"PyTorchJob{outcome}"
    assert not any(e[1] == "ChildRecreated" for e in kube.events(namespace, name))
    assert first_uid  # the only PyTorchJob this ForgeJob ever had


def test_pytorchjob_deleted_mid_run_is_recreated_with_its_finalizer(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    """No final condition was ever seen: the run is re-created (and the deleted one was let go)."""
    kube.create_forgejob(namespace, forgejob("midrun"))
    first = wait_for(lambda: kube.pytorchjob(namespace, "midrun"), what="PyTorchJob", context=operator_process.log_tail)
    trainer_op = TrainingOperatorStatus(kube, namespace, "midrun")
    trainer_op.created()
    trainer_op.running()
    wait_value(lambda: kube.state(namespace, "midrun"), "Running", "state", operator_process)
    kube.custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", "midrun")
    second = wait_for(
        lambda: (lambda j: j if j and j["metadata"]["uid"] != first["metadata"]["uid"] else None)(
            kube.pytorchjob(namespace, "midrun")
        ),
        what="the PyTorchJob re-created",
        context=operator_process.log_tail,
    )
    assert second["metadata"]["finalizers"] == [FINALIZER]
    assert second["spec"]["pytorchReplicaSpecs"] == first["spec"]["pytorchReplicaSpecs"]
    kube.wait_event(namespace, "midrun", "ChildRecreated", kind="Warning")


def test_a_deleted_forgejob_lets_its_pytorchjob_go(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("bye"))
    wait_for(lambda: kube.pytorchjob(namespace, "bye"), what="PyTorchJob", context=operator_process.log_tail)
    kube.custom.delete_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", "bye")
    wait_for(lambda: kube.pytorchjob(namespace, "bye") is None, timeout=60, what="PyTorchJob garbage-collected")


# --- Kueue ------------------------------------------------------------------------------------------------------


def test_kueue_admission_preemption_and_readmission_are_never_fought(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    name = "queued"
    scheduling = {"queueName": "team-a", "workloadPriorityClass": "research-high", "priorityClassName": "batch-low"}
    kube.create_forgejob(namespace, forgejob(name, scheduling=scheduling))
    job = wait_for(lambda: kube.pytorchjob(namespace, name), what="PyTorchJob", context=operator_process.log_tail)
    # What Kueue reads: its labels on the job, and a job that is suspended from creation (as its webhook makes it).
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert job["metadata"]["labels"][PRIORITY_LABEL] == "research-high"
    assert job["spec"]["runPolicy"]["suspend"] is True
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["priorityClassName"] == "batch-low"
    trainer_op = TrainingOperatorStatus(kube, namespace, name)
    trainer_op.created()
    trainer_op.suspended()
    wait_value(lambda: kube.state(namespace, name), "Queued", "state", operator_process)
    queued = condition_of(kube, namespace, name, "Queued")
    assert queued["status"] == "True" and queued["reason"] == "WaitingForAdmission"
    assert "LocalQueue team-a" in queued["message"] and "kubectl get workloads" in queued["message"]
    after_resyncs(kube, operator_process)
    assert run_policy(kube, namespace, name)["suspend"] is True, "the operator un-suspended a job Kueue holds"

    # Admission: Kueue un-suspends the job and injects its flavor's node labels into every pod template.
    admit = {"spec": {"runPolicy": {"suspend": False}, "pytorchReplicaSpecs": {}}}
    for kind in ("Master", "Worker"):
        admit["spec"]["pytorchReplicaSpecs"][kind] = {"template": {"spec": {"nodeSelector": FLAVOR}}}
    patch_pytorchjob(kube, namespace, name, admit)
    trainer_op.resumed()
    trainer_op.running()
    wait_value(lambda: kube.state(namespace, name), "Running", "state", operator_process)
    admitted = condition_of(kube, namespace, name, "Queued")
    assert admitted["status"] == "False" and admitted["reason"] == "Admitted"
    after_resyncs(kube, operator_process)
    assert run_policy(kube, namespace, name)["suspend"] is False
    assert node_selectors(kube, namespace, name) == [FLAVOR, FLAVOR], "Kueue's node selectors were reverted"

    # Pre-emption: Kueue suspends the job again and restores the templates.
    evict = {"spec": {"runPolicy": {"suspend": True}, "pytorchReplicaSpecs": {}}}
    for kind in ("Master", "Worker"):
        evict["spec"]["pytorchReplicaSpecs"][kind] = {"template": {"spec": {"nodeSelector": None}}}
    patch_pytorchjob(kube, namespace, name, evict)
    trainer_op.suspended()
    wait_value(lambda: kube.state(namespace, name), "Queued", "state", operator_process)
    preempted = condition_of(kube, namespace, name, "Queued")
    assert preempted["status"] == "True" and preempted["reason"] == "Preempted"
    after_resyncs(kube, operator_process)
    assert run_policy(kube, namespace, name)["suspend"] is True, "the operator resumed a pre-empted job"
    kube.wait_event(namespace, name, "Queued")

    # The user's suspend/resume on a queued run: suspend is written once; resume is left to Kueue's admission.
    kube.patch_forgejob(namespace, name, {"spec": {"suspend": True}})
    wait_value(
        lambda: (kube.pytorchjob(namespace, name) or {})["metadata"]["annotations"].get("forge.dev/suspend-requested"),
        "true",
        "suspend recorded",
        operator_process,
    )
    wait_value(lambda: kube.state(namespace, name), "Suspended", "state", operator_process)
    kube.patch_forgejob(namespace, name, {"spec": {"suspend": False}})
    kube.wait_event(
        namespace, name, "Resuming", message=f"PyTorchJob {name} is queued: Kueue un-suspends it when it admits the run"
    )
    after_resyncs(kube, operator_process)
    assert run_policy(kube, namespace, name)["suspend"] is True, (
        "the operator un-suspended a job Kueue has not admitted"
    )
    wait_value(lambda: kube.state(namespace, name), "Queued", "state", operator_process)
    assert len(kube.pytorchjobs(namespace)) == 1


def test_suspend_is_written_only_when_spec_suspend_changes(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    """Someone else (a queue manager without Forge's queue label, an admin) suspends the PyTorchJob: a resync leaves
    it; the user's next change of spec.suspend is applied."""
    kube.create_forgejob(namespace, forgejob("edge"))
    wait_for(lambda: kube.pytorchjob(namespace, "edge"), what="PyTorchJob", context=operator_process.log_tail)
    assert run_policy(kube, namespace, "edge")["suspend"] is False
    patch_pytorchjob(kube, namespace, "edge", {"spec": {"runPolicy": {"suspend": True}}})
    after_resyncs(kube, operator_process)
    assert run_policy(kube, namespace, "edge")["suspend"] is True
    kube.patch_forgejob(namespace, "edge", {"spec": {"suspend": True}})
    kube.patch_forgejob(namespace, "edge", {"spec": {"suspend": False}})
    wait_value(
        lambda: run_policy(kube, namespace, "edge")["suspend"], False, "resumed by spec.suspend", operator_process
    )


# --- resync -------------------------------------------------------------------------------------------------------


def test_resync_restores_operator_owned_status_written_by_someone_else(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("owned"))
    wait_for(lambda: kube.pytorchjob(namespace, "owned"), what="PyTorchJob", context=operator_process.log_tail)
    trainer_op = TrainingOperatorStatus(kube, namespace, "owned")
    trainer_op.created()
    trainer_op.running()
    wait_value(lambda: kube.state(namespace, "owned"), "Running", "state", operator_process)
    before = kube.forgejob(namespace, "owned")["status"]

    # Another writer (a script, an old trainer) wipes the operator's fields; no PyTorchJob event follows.
    kube.patch_forgejob_status(namespace, "owned", {"status": {"conditions": [], "resolved": None, "state": "Failed"}})

    wait_for(
        lambda: (lambda s: s if s.get("resolved") == before["resolved"] and s.get("state") == "Running" else None)(
            kube.forgejob(namespace, "owned")["status"]
        ),
        what="resolved and state restored",
        context=operator_process.log_tail,
    )
    for condition_type in ("Accepted", "Created", "Running"):
        wait_value(
            lambda t=condition_type: condition_of(kube, namespace, "owned", t).get("status"),
            "True",
            f"{condition_type} restored",
            operator_process,
        )


# --- literal env values stay out of annotations ----------------------------------------------------------------------


def test_literal_env_values_are_copied_into_no_annotation(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    secretish = "glpat-literal-token-93c1"
    env = [{"name": "HF_TOKEN", "value": secretish}]
    kube.create_forgejob(namespace, forgejob("envy", env=env))
    job = wait_for(lambda: kube.pytorchjob(namespace, "envy"), what="PyTorchJob", context=operator_process.log_tail)
    wait_value(
        lambda: condition_of(kube, namespace, "envy", "Accepted").get("status"), "True", "Accepted", operator_process
    )
    forge = kube.forgejob(namespace, "envy")
    annotations = forge["metadata"].get("annotations") or {}
    assert "forge.dev/last-handled-configuration" in annotations, "kopf's diff base is where a copy would be"
    config_map = kube.core.read_namespaced_config_map("envy-config", namespace)
    for owner, metadata in (
        ("ForgeJob", annotations),
        ("ConfigMap", config_map.metadata.annotations or {}),
        ("PyTorchJob", job["metadata"].get("annotations") or {}),
    ):
        assert secretish not in json.dumps(metadata), f"{owner} annotations hold the literal value"
    assert secretish in config_map.data["accepted-spec.json"], "the accepted spec lives in the ConfigMap's data"

    # A changed value is still a spec change (the digest in the diff base differs): refused on a started run.
    kube.patch_forgejob(namespace, "envy", {"spec": {"env": [{"name": "HF_TOKEN", "value": secretish + "x"}]}})
    refused = wait_for(
        lambda: (lambda c: c if c.get("reason") == "SpecChangeRefused" else None)(
            condition_of(kube, namespace, "envy", "Accepted")
        ),
        what="the env change refused",
        context=operator_process.log_tail,
    )
    assert refused["message"].startswith("spec.env changed"), refused["message"]
    assert secretish not in json.dumps(kube.forgejob(namespace, "envy")["metadata"].get("annotations") or {})
