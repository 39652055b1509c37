"""The TrainJob backend (Kubeflow Trainer v2): rendering, the condition mapping, validation, the real v2.3.0 CRD and
the operator running a ForgeJob as a TrainJob on the local API server."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from forge_operator.api import ForgeJobSpec, ForgeJobStatus
from forge_operator.backends import PYTORCHJOB, TRAINJOB, chosen, install_hint
from forge_operator.defaults import resolve
from forge_operator.render import (
    FINAL_STATUS_FINALIZER,
    QUEUE_LABEL,
    Owner,
    RenderOptions,
    build_pytorchjob,
    build_trainjob,
)
from forge_operator.settings import Settings
from forge_operator.status import Acceptance, desired_status
from forge_operator.validation import validate
from tests.conftest import REPO_ROOT, trainer_v2_fixtures
from tests.operator.helpers import POD_TEMPLATE_RESOURCES, Kube, OperatorProcess, forgejob, wait_for

OWNER = Owner("bot", "team-a", "uid-1")
OPTIONS = RenderOptions(trainer_image="img:1")
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def spec_of(**overrides: Any) -> ForgeJobSpec:
    raw = forgejob("bot", backend="trainjob")["spec"]
    raw.update(overrides)
    return ForgeJobSpec.model_validate(raw)


def node_patch(job: dict[str, Any]) -> dict[str, Any]:
    """The pod template patch of the replicated job "node" in Forge's runtime patch."""
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "forge.dev/forge-operator"
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    template: dict[str, Any] = replicated["template"]["spec"]["template"]
    return template


# --- rendering ----------------------------------------------------------------------------------------------------


def test_trainjob_shape() -> None:
    spec = spec_of(resources={"nodes": 3, "gpusPerNode": 8, "resources": {"requests": {"cpu": "16"}}})
    job = build_trainjob(OWNER, spec, OPTIONS)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "bot" and job["metadata"]["namespace"] == "team-a"
    assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == ["uid-1"]
    assert job["metadata"]["finalizers"] == [FINAL_STATUS_FINALIZER]
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert job["spec"]["suspend"] is False
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "img:1"
    # forge-trainer reads the runtime's PET_* variables itself: no torchrun hides its exit code.
    assert trainer["command"] == ["forge-trainer", "--config", "/etc/forge/config.json"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {
        "limits": {"nvidia.com/gpu": 8},
        "requests": {"cpu": "16", "nvidia.com/gpu": 8},
    }
    assert {"name": "PYTHONUNBUFFERED", "value": "1"} in trainer["env"]
    template = node_patch(job)
    assert template["metadata"]["labels"]["forge.dev/forgejob"] == "bot"
    pod = template["spec"]
    assert pod["serviceAccountName"] == "bot-trainer"
    assert {v["name"] for v in pod["volumes"]} == {"forge-config", "scratch", "tmp", "dshm"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/etc/forge", "/tmp/forge", "/tmp", "/dev/shm"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_trainjob_carries_what_the_pytorchjob_template_has_that_v2_3_can_take() -> None:
    spec = spec_of(
        resources={
            **forgejob("x")["spec"]["resources"],
            **POD_TEMPLATE_RESOURCES,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullSecrets": ["regcred"],
        },
        env=[{"name": "HF_HOME", "value": "/cache/hf"}],
        runPolicy={"activeDeadlineSeconds": 7200},
    )
    pytorch_pod = build_pytorchjob(OWNER, spec, OPTIONS)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    job = build_trainjob(OWNER, spec, OPTIONS)
    template = node_patch(job)
    assert template["metadata"] == pytorch_pod["metadata"]
    for field in ("affinity", "volumes", "nodeSelector", "tolerations", "imagePullSecrets", "securityContext"):
        assert template["spec"][field] == pytorch_pod["spec"][field], field
    assert template["spec"]["containers"][0]["volumeMounts"] == pytorch_pod["spec"]["containers"][0]["volumeMounts"]
    assert job["spec"]["trainer"]["env"] == pytorch_pod["spec"]["containers"][0]["env"]
    assert job["spec"]["activeDeadlineSeconds"] == 7200


def test_runtime_comes_from_the_spec_or_the_operator() -> None:
    assert build_trainjob(OWNER, spec_of(), RenderOptions(trainer_image="i:1", training_runtime="torch-gpu"))["spec"][
        "runtimeRef"
    ]["name"] == ("torch-gpu")
    job = build_trainjob(OWNER, spec_of(trainingRuntime="torch-h100"), OPTIONS)
    assert job["spec"]["runtimeRef"]["name"] == "torch-h100"


def test_a_queued_trainjob_is_created_suspended_with_kueues_label() -> None:
    job = build_trainjob(OWNER, spec_of(scheduling={"queueName": "team-a"}), OPTIONS)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert build_trainjob(OWNER, spec_of(suspend=True), OPTIONS)["spec"]["suspend"] is True


def test_the_backend_comes_from_the_spec_or_the_operator_default() -> None:
    assert chosen(spec_of(), "pytorchjob") is TRAINJOB
    assert chosen(ForgeJobSpec.model_validate(forgejob("x")["spec"]), "pytorchjob") is PYTORCHJOB
    assert chosen(ForgeJobSpec.model_validate(forgejob("x")["spec"]), "trainjob") is TRAINJOB
    settings = Settings(default_backend="trainjob", backends="trainjob", trainjob_runtime="torch-gpu")  # type: ignore[arg-type]
    assert settings.backends == ["trainjob"] and settings.render_options().training_runtime == "torch-gpu"
    with pytest.raises(ValueError, match="default_backend: trainjob is not in backends"):
        Settings(default_backend="trainjob", backends="pytorchjob")  # type: ignore[arg-type]


def test_missing_api_names_what_to_install() -> None:
    hint = install_hint("/apis/trainer.kubeflow.org/v1alpha1/namespaces/a/trainjobs")
    assert hint is not None and "kubectl get crd trainjobs.trainer.kubeflow.org" in hint
    assert "pytorchjobs.kubeflow.org" in (install_hint("/apis/kubeflow.org/v1/namespaces/a/pytorchjobs") or "")
    assert install_hint("/api/v1/namespaces/a/configmaps") is None


# --- validation ---------------------------------------------------------------------------------------------------


def test_what_a_trainjob_cannot_carry_is_refused_naming_the_field() -> None:
    spec = spec_of(
        envFrom=[{"secretRef": {"name": "s3"}}],
        scheduling={"priorityClassName": "high", "schedulerName": "volcano", "gang": {}},
        runPolicy={"ttlSecondsAfterFinished": 60, "restartPolicy": "OnFailure", "backoffLimit": 1},
        resources={"nodes": 2, "gpusPerNode": 0, "imagePullPolicy": "Always"},
    )
    paths = {error.path for error in validate("bot", spec, "img:1")}
    assert paths == {
        "spec.envFrom",
        "spec.scheduling.priorityClassName",
        "spec.scheduling.schedulerName",
        "spec.scheduling.gang",
        "spec.runPolicy.ttlSecondsAfterFinished",
        "spec.runPolicy.restartPolicy",
        "spec.runPolicy.backoffLimit",
        "spec.resources.imagePullPolicy",
    }
    # The same spec on the PyTorchJob backend has none of these problems.
    pytorch = spec.model_copy(update={"backend": "pytorchjob"})
    assert not {e.path for e in validate("bot", pytorch, "img:1")} & paths


def test_backend_enabled_and_runtime_only_with_trainjob() -> None:
    errors = validate("bot", spec_of(), "img:1", backends=["pytorchjob"])
    assert [e.path for e in errors] == ["spec.backend"] and "not enabled" in errors[0].message
    pytorch = ForgeJobSpec.model_validate({**forgejob("x")["spec"], "trainingRuntime": "torch-distributed"})
    assert [e.path for e in validate("bot", pytorch, "img:1")] == ["spec.trainingRuntime"]
    assert validate("a" * 51, spec_of(), "img:1") == []  # '<name>-node-0-1023' is a valid host name
    assert (
        validate("bot", ForgeJobSpec.model_validate(forgejob("x")["spec"]), "img:1", default_backend="trainjob") == []
    )


# --- the condition mapping ----------------------------------------------------------------------------------------


def trainjob_object(conditions: list[dict[str, str]], *, suspend: bool = False, ready: int = 0) -> dict[str, Any]:
    return {
        "metadata": {"name": "bot", "namespace": "team-a", "labels": {}},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": conditions,
            "jobsStatus": [{"name": "node", "ready": ready, "active": ready, "succeeded": 0, "failed": 0}],
        },
    }


def condition(ctype: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": "t0"}


def test_trainjob_conditions_map_to_the_forgejob_vocabulary() -> None:
    created = condition("Created", "True", "JobsCreationSucceeded")
    report = TRAINJOB.report(trainjob_object([created]))
    assert set(report.conditions) == {"Created"} and not report.suspended
    running = TRAINJOB.report(trainjob_object([created], ready=1))
    assert running.conditions["Running"]["status"] == "True"
    suspended = TRAINJOB.report(trainjob_object([created, condition("Suspended", "True", "Suspended")], suspend=True))
    assert suspended.suspended and "Running" not in suspended.conditions
    assert suspended.conditions["Suspended"]["status"] == "True"
    done = trainjob_object([created, condition("Complete", "True", "AllJobsCompleted", "jobset completed")], ready=1)
    assert TRAINJOB.report(done).conditions["Succeeded"]["reason"] == "AllJobsCompleted"
    assert "Running" not in TRAINJOB.report(done).conditions
    assert TRAINJOB.finished(done)
    failed = trainjob_object([created, condition("Failed", "True", "FailedJobs", "jobset failed")])
    assert TRAINJOB.finished(failed) and TRAINJOB.report(failed).conditions["Failed"]["status"] == "True"
    assert not TRAINJOB.finished(trainjob_object([created], ready=1))
    assert TRAINJOB.suspend_patch(True) == {"suspend": True}
    assert PYTORCHJOB.suspend_patch(False) == {"runPolicy": {"suspend": False}}


def test_forgejob_state_follows_a_trainjob_to_success() -> None:
    spec = spec_of()
    resolved = resolve(spec)
    acceptance = Acceptance(1, True, "Accepted", "TrainJob bot", resolved=resolved, train_job="bot")
    first = desired_status(ForgeJobStatus(), spec, generation=1, at="t1", acceptance=acceptance)
    assert first.patch["status"]["trainJob"] == "bot" and "pytorchJob" not in first.patch["status"]
    status = ForgeJobStatus.model_validate(first.patch["status"])
    created = condition("Created", "True", "JobsCreationSucceeded")
    running = desired_status(
        status, spec, generation=1, at="t2", child=TRAINJOB.report(trainjob_object([created], ready=1))
    )
    assert running.state == "Running"
    status = ForgeJobStatus.model_validate({**status.to_api(), **running.patch["status"]})
    done = trainjob_object([created, condition("Complete", "True", "AllJobsCompleted")], ready=1)
    succeeded = desired_status(status, spec, generation=1, at="t3", child=TRAINJOB.report(done))
    assert succeeded.state == "Succeeded"


def test_a_failed_trainjob_of_an_early_stop_ends_early_stopped() -> None:
    spec = spec_of()
    status = ForgeJobStatus.model_validate(
        {
            "trainJob": "bot",
            "state": "Running",
            "conditions": [condition("Accepted", "True", "Accepted")],
            "earlyStop": {"step": 10, "reason": "LearningRateTooHigh", "message": "too hot"},
        }
    )
    failed = trainjob_object([condition("Failed", "True", "FailedJobs", "jobset failed")])
    change = desired_status(status, spec, generation=1, at="t", child=TRAINJOB.report(failed))
    assert change.state == "EarlyStopped"
    conditions = {c["type"]: c for c in change.patch["status"]["conditions"]}
    assert conditions["Failed"]["status"] == "False" and "the TrainJob reported" in conditions["Failed"]["message"]


# --- the real Kubeflow Trainer v2.3.0 CRD -------------------------------------------------------------------------


def _require_real_crd() -> None:
    if trainer_v2_fixtures() is None:
        pytest.skip("Kubeflow Trainer v2.3.0's CRDs are not in ../shared/fixtures: nothing to validate against")


def _create(kube: Kube, namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["metadata"]["namespace"] = namespace
    job["metadata"].pop("ownerReferences")
    job["metadata"].pop("finalizers")
    created: dict[str, Any] = kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    return created


def _contains(stored: Any, written: Any, path: str) -> None:
    """Every field written came back (1.20 prunes unknown fields silently); the server may add defaults."""
    if isinstance(written, dict):
        assert isinstance(stored, dict), path
        for key, value in written.items():
            assert key in stored, f"{path}.{key} was pruned by the TrainJob schema"
            _contains(stored[key], value, f"{path}.{key}")
    elif isinstance(written, list):
        assert isinstance(stored, list) and len(stored) == len(written), path
        for index, (got, want) in enumerate(zip(stored, written, strict=True)):
            _contains(got, want, f"{path}[{index}]")
    else:
        assert stored == written, f"{path}: {stored!r} != {written!r}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_as_a_trainjob_is_accepted_by_the_trainer_crd(kube: Kube, namespace: str, path: Path) -> None:
    _require_real_crd()
    document = yaml.safe_load(path.read_text())
    spec = ForgeJobSpec.model_validate({**document["spec"], "backend": "trainjob"})
    name = document["metadata"]["name"]
    assert validate(name, spec, "img:1") == []
    job = build_trainjob(Owner(name, namespace, "0000"), spec, OPTIONS)
    created = _create(kube, namespace, job)
    _contains(created["spec"], job["spec"], "spec")


def test_a_trainjob_with_every_pod_template_field_is_accepted(kube: Kube, namespace: str) -> None:
    _require_real_crd()
    spec = spec_of(
        resources={
            **forgejob("x")["spec"]["resources"],
            **POD_TEMPLATE_RESOURCES,
            "gpusPerNode": 2,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullSecrets": ["regcred"],
            "scratchSizeLimit": "100Gi",
            "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi"}},
        },
        env=[
            {"name": "HF_HOME", "value": "/cache/hf"},
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        scheduling={"queueName": "team-a", "workloadPriorityClass": "high"},
        runPolicy={"activeDeadlineSeconds": 3600},
    )
    assert validate("dry", spec, "img:1") == []
    job = build_trainjob(Owner("dry", namespace, "0000"), spec, OPTIONS)
    created = _create(kube, namespace, job)
    _contains(created["spec"], job["spec"], "spec")
    assert created["metadata"]["labels"][QUEUE_LABEL] == "team-a"


def test_the_trainer_crd_check_can_fail(kube: Kube, namespace: str) -> None:
    """The schema checks above can fail: the real CRD rejects a TrainJob whose numNodes is not a number."""
    _require_real_crd()
    job = build_trainjob(Owner("bad", namespace, "0000"), spec_of(), OPTIONS)
    job["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(ApiException) as raised:
        _create(kube, namespace, job)
    assert raised.value.status == 422 and "spec.trainer.numNodes" in str(raised.value.body)


# --- the operator, with a TrainJob --------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_trainjob_status(kube: Kube, namespace: str, name: str, conditions: list[dict[str, str]], ready: int) -> None:
    """What Kubeflow Trainer's controller writes (conditions are metav1.Conditions; jobsStatus per child Job)."""
    job = kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    job["status"] = {
        "conditions": [{**c, "lastTransitionTime": _now()} for c in conditions],
        "jobsStatus": [{"name": "node", "active": ready, "ready": ready, "succeeded": 0, "failed": 0, "suspended": 0}],
    }
    kube.custom.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, job)


@pytest.fixture
def trainjob_kube(kube: Kube, operator_process: OperatorProcess) -> Iterator[Kube]:
    yield kube


def test_operator_runs_a_forgejob_as_a_trainjob(trainjob_kube: Kube, namespace: str) -> None:
    kube = trainjob_kube
    name = "tj"
    kube.create_forgejob(namespace, forgejob(name, backend="trainjob"))

    def trainjob() -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return found
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    job = wait_for(trainjob, what="the TrainJob")
    assert [o["kind"] for o in job["metadata"]["ownerReferences"]] == ["ForgeJob"]
    assert job["metadata"]["finalizers"] == [FINAL_STATUS_FINALIZER]
    assert kube.pytorchjob(namespace, name) is None
    accepted = wait_for(lambda: kube.condition(namespace, name, "Accepted"), what="Accepted")
    assert accepted["status"] == "True" and accepted["message"].startswith(f"TrainJob {name}:")
    assert kube.forgejob(namespace, name)["status"]["trainJob"] == name

    created = condition("Created", "True", "JobsCreationSucceeded", "succeeded to create Jobs")
    write_trainjob_status(kube, namespace, name, [created], ready=1)
    wait_for(lambda: kube.state(namespace, name) == "Running", what="Running")

    kube.patch_forgejob(namespace, name, {"spec": {"suspend": True}})
    wait_for(lambda: (trainjob() or {}).get("spec", {}).get("suspend") is True, what="TrainJob spec.suspend true")
    write_trainjob_status(
        kube, namespace, name, [created, condition("Suspended", "True", "Suspended", "TrainJob is suspended")], ready=0
    )
    wait_for(lambda: kube.state(namespace, name) == "Suspended", what="Suspended")
    kube.patch_forgejob(namespace, name, {"spec": {"suspend": False}})
    wait_for(lambda: (trainjob() or {}).get("spec", {}).get("suspend") is False, what="TrainJob resumed")

    resumed = condition("Suspended", "False", "Resumed", "TrainJob is resumed")
    complete = condition("Complete", "True", "AllJobsCompleted", "jobset completed successfully")
    write_trainjob_status(kube, namespace, name, [created, resumed, complete], ready=1)
    wait_for(lambda: kube.state(namespace, name) == "Succeeded", what="Succeeded")

    # A finished run never starts again: its TrainJob deleted (TTL clean-up), the ForgeJob keeps its end.
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    wait_for(lambda: trainjob() is None, what="the TrainJob gone (finalizer released)")
    wait_for(lambda: kube.state(namespace, name) == "Succeeded", what="still Succeeded")
    assert trainjob() is None


def test_a_started_run_keeps_its_backend_whatever_the_default_becomes() -> None:
    from forge_operator.context import OperatorContext
    from forge_operator.handlers.handle_reconcile_forgejob import backend_of

    def ctx(default: str) -> OperatorContext:
        settings = Settings(default_backend=default)  # type: ignore[arg-type]
        return OperatorContext(settings=settings, kube=None)  # type: ignore[arg-type]

    unset = ForgeJobSpec.model_validate(forgejob("x")["spec"])
    assert backend_of(ctx("pytorchjob"), ForgeJobStatus(), unset) is PYTORCHJOB
    assert backend_of(ctx("trainjob"), ForgeJobStatus(), unset) is TRAINJOB
    assert backend_of(ctx("pytorchjob"), ForgeJobStatus(trainJob="x"), unset) is TRAINJOB  # type: ignore[call-arg]
    assert backend_of(ctx("trainjob"), ForgeJobStatus(pytorchJob="x"), unset) is PYTORCHJOB  # type: ignore[call-arg]


def test_kueue_holds_a_queued_trainjob() -> None:
    spec = spec_of(scheduling={"queueName": "team-a"})
    status = ForgeJobStatus.model_validate(
        {"trainJob": "bot", "conditions": [condition("Accepted", "True", "Accepted")]}
    )
    held = trainjob_object([condition("Created", "True", "JobsCreationSucceeded")], suspend=True)
    held["metadata"]["labels"] = {QUEUE_LABEL: "team-a"}
    change = desired_status(status, spec, generation=1, at="t", child=TRAINJOB.report(held))
    assert change.state == "Queued"
    queued = {c["type"]: c for c in change.patch["status"]["conditions"]}["Queued"]
    assert queued["reason"] == "WaitingForAdmission" and queued["message"].startswith("TrainJob bot is held")
