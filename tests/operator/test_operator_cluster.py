"""The operator against the real local control plane: children, transitions, selection, suspend, spec changes, GC."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from forge_operator.render import ACCEPTED_SPEC_KEY, canonical_json
from tests.conftest import LocalCluster, uses_real_kubeflow_crd
from tests.operator.helpers import (
    GANG_SCHEDULING,
    POD_TEMPLATE_ENV_FROM,
    POD_TEMPLATE_RESOURCES,
    Kube,
    OperatorProcess,
    TrainingOperatorStatus,
    forgejob,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("operator_process")

CHILD_NAMES = {
    "ConfigMap": "{}-config",
    "ServiceAccount": "{}-trainer",
    "Role": "{}-trainer",
    "RoleBinding": "{}-trainer",
}


def children(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    """Each child of a ForgeJob as a dict (None when absent)."""

    def read(reader: Any, child: str) -> Any:
        try:
            return kube.api.sanitize_for_serialization(reader(child, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    return {
        "ConfigMap": read(kube.core.read_namespaced_config_map, f"{name}-config"),
        "ServiceAccount": read(kube.core.read_namespaced_service_account, f"{name}-trainer"),
        "Role": read(kube.rbac.read_namespaced_role, f"{name}-trainer"),
        "RoleBinding": read(kube.rbac.read_namespaced_role_binding, f"{name}-trainer"),
        "PyTorchJob": kube.pytorchjob(namespace, name),
    }


def wait_accepted(kube: Kube, operator: OperatorProcess, namespace: str, name: str) -> dict[str, Any]:
    def accepted() -> dict[str, Any] | None:
        condition = kube.condition(namespace, name, "Accepted")
        return condition if condition and condition["status"] == "True" else None

    wait_for(accepted, what=f"{name} Accepted=True", context=operator.log_tail)
    return wait_for(lambda: kube.pytorchjob(namespace, name), what=f"PyTorchJob {name}", context=operator.log_tail)


def wait_accepted_generation(
    kube: Kube, operator: OperatorProcess, namespace: str, name: str, generation: int
) -> dict[str, Any]:
    """The Accepted condition once the operator has judged ``generation`` of the spec (True or False)."""

    def judged() -> dict[str, Any] | None:
        condition = kube.condition(namespace, name, "Accepted")
        return condition if condition and condition.get("observedGeneration") == generation else None

    return wait_for(judged, what=f"{name} generation {generation} reconciled", context=operator.log_tail)


def wait_state(kube: Kube, operator: OperatorProcess, namespace: str, name: str, state: str) -> None:
    wait_for(
        lambda: kube.state(namespace, name) == state,
        what=f"{name} state {state}",
        context=lambda: f"state={kube.state(namespace, name)}\n{operator.log_tail()}",
    )


def test_apply_creates_owned_children_with_the_right_specs(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    created = kube.create_forgejob(
        namespace,
        forgejob(
            "support-bot",
            resources={
                "nodes": 3,
                "gpusPerNode": 2,
                "resources": {"limits": {"cpu": "8", "memory": "32Gi"}, "requests": {"cpu": 4}},
                "nodeSelector": {"nvidia.com/gpu.product": "H100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            env=[
                {"name": "AWS_ENDPOINT_URL", "value": "http://s3.local:9000"},
                {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
            ],
            runPolicy={"backoffLimit": 5, "ttlSecondsAfterFinished": 3600},
        ),
    )
    uid = created["metadata"]["uid"]
    wait_accepted(kube, operator_process, namespace, "support-bot")
    found = wait_for(
        lambda: (lambda c: c if all(c.values()) else None)(children(kube, namespace, "support-bot")),
        what="every child",
        context=operator_process.log_tail,
    )
    for kind, child in found.items():
        owners = child["metadata"]["ownerReferences"]
        assert owners == [
            {
                "apiVersion": "forge.dev/v1alpha1",
                "kind": "ForgeJob",
                "name": "support-bot",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], kind
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "forge-operator", kind
        assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "support-bot", kind

    config = json.loads(found["ConfigMap"]["data"]["config.json"])
    assert config["jobName"] == "support-bot" and config["namespace"] == namespace
    assert config["report"]["forgeJob"] == {
        "group": "forge.dev",
        "version": "v1alpha1",
        "plural": "forgejobs",
        "namespace": namespace,
        "name": "support-bot",
    }
    # 3 nodes x 2 GPUs = 6 processes; 262144 tokens / (1024 x 2 x 6) = 21.3 -> 21 micro-batches.
    assert config["training"]["gradientAccumulationSteps"] == 21
    assert config["training"]["globalBatchTokens"] == 21 * 1024 * 2 * 6

    rules = found["Role"]["rules"]
    assert rules == [
        {"apiGroups": ["forge.dev"], "resources": ["forgejobs"], "resourceNames": ["support-bot"], "verbs": ["get"]},
        {
            "apiGroups": ["forge.dev"],
            "resources": ["forgejobs/status"],
            "resourceNames": ["support-bot"],
            "verbs": ["get", "patch"],
        },
    ]
    binding = found["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "support-bot-trainer",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "support-bot-trainer", "namespace": namespace}]

    job = found["PyTorchJob"]["spec"]
    assert job["nprocPerNode"] == "2"
    assert job["runPolicy"] == {"backoffLimit": 5, "ttlSecondsAfterFinished": 3600, "suspend": False}
    assert set(job["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    assert job["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert job["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    for replica in job["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
        pod = replica["template"]["spec"]
        assert pod["serviceAccountName"] == "support-bot-trainer"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == "registry.example/forge-trainer:test"
        assert container["command"] == ["forge-trainer", "--config", "/etc/forge/config.json"]
        assert container["ports"] == [
            {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},  # local rank 0
            {"name": "metrics-1", "containerPort": 9401, "protocol": "TCP"},  # local rank 1
        ]
        # The ForgeJob's own resources: the operator's defaults (FORGE_TRAINER_RESOURCES) do not mix in.
        assert container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2}
        assert container["resources"]["requests"] == {"cpu": 4, "nvidia.com/gpu": 2}
        assert container["imagePullPolicy"] == "IfNotPresent"  # FORGE_TRAINER_IMAGE_PULL_POLICY
        assert {"name": "forge-config", "mountPath": "/etc/forge", "readOnly": True} in container["volumeMounts"]
        assert {"name": "forge-config", "configMap": {"name": "support-bot-config"}} in pod["volumes"]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "id"}}

    status = kube.forgejob(namespace, "support-bot")["status"]
    assert status["observedGeneration"] == 1
    assert status["pytorchJob"] == "support-bot"
    assert status["resolved"]["worldSize"] == 6
    assert status["resolved"]["learningRateSource"] == "auto"
    assert status["state"] == "Pending"
    kube.wait_event(namespace, "support-bot", "Accepted", kind="Normal")


def test_single_node_cpu_job_has_no_worker_and_no_gpu(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("solo", resources={"nodes": 1, "gpusPerNode": 0}))
    job = wait_accepted(kube, operator_process, namespace, "solo")["spec"]
    assert set(job["pytorchReplicaSpecs"]) == {"Master"}
    assert job["nprocPerNode"] == "1"
    container = job["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))
    # No spec.resources.resources: the operator's FORGE_TRAINER_RESOURCES apply.
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    assert [p["name"] for p in container["ports"]] == ["pytorchjob-port", "metrics"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"resources": {"nodes": 1, "gpusPerNode": 8}},
        {"resources": {"nodes": 16, "gpusPerNode": 8, "imagePullPolicy": "IfNotPresent"}},
        {"resources": {"nodes": 2, "gpusPerNode": 0, "tolerations": [{"key": "k", "operator": "Equal", "value": "v"}]}},
        {
            "resources": {
                "nodes": 2,
                "gpusPerNode": 2,
                "gpuResource": "nvidia.com/mig-3g.40gb",
                "imagePullSecrets": ["registry-creds"],
                "scratchSizeLimit": "200Gi",
                "shmSizeLimit": "16Gi",
            }
        },
        # Issue 12 items 4 and 5: affinity, extra volumes and mounts, pod labels and annotations, envFrom, and a gang
        # (runPolicy.schedulingPolicy and schedulerName).
        {
            "resources": {"nodes": 3, "gpusPerNode": 1, **POD_TEMPLATE_RESOURCES},
            "envFrom": POD_TEMPLATE_ENV_FROM,
            "scheduling": GANG_SCHEDULING,
        },
        {"resources": {"nodes": 4}, "scheduling": {"schedulerName": "scheduler-plugins-scheduler", "gang": {}}},
    ],
    ids=["1x8", "16x8", "cpu-tolerations", "mig-secrets-limits", "pod-template-and-volcano-gang", "coscheduling"],
)
def test_rendered_pytorchjobs_pass_the_kubeflow_schema(
    cluster: LocalCluster, kube: Kube, namespace: str, overrides: dict[str, Any]
) -> None:
    """Server-side dry runs of rendered PyTorchJobs against Kubeflow's own CRD schema (pruning would drop fields)."""
    if not uses_real_kubeflow_crd():
        pytest.skip("Kubeflow's PyTorchJob CRD is not in ../shared/fixtures: nothing to validate against")
    from forge_operator.api import ForgeJobSpec
    from forge_operator.kube import Kube as OperatorKube
    from forge_operator.render import Owner, RenderOptions, build_pytorchjob
    from forge_operator.validation import validate

    raw = forgejob("x")["spec"]
    raw.update(overrides)
    raw["resources"] = {**forgejob("x")["spec"]["resources"], **overrides.get("resources", {})}
    spec = ForgeJobSpec.model_validate(raw)
    assert validate("dry", spec, "img:1") == []
    rendered = build_pytorchjob(Owner("dry", namespace, "0000"), spec, RenderOptions(trainer_image="img:1"))
    rendered["metadata"].pop("ownerReferences")
    created = kube.custom.create_namespaced_custom_object(
        "kubeflow.org", "v1", namespace, "pytorchjobs", rendered, dry_run="All"
    )
    assert created["spec"] == rendered["spec"], "the Kubeflow schema pruned or changed rendered fields"
    # The pods the training operator will create from each template pass the core API's own validation (and its
    # admission, which needs their ServiceAccount).
    kube.core.create_namespaced_service_account(namespace, {"metadata": {"name": "dry-trainer"}})
    priority_class = spec.scheduling.priority_class_name
    if priority_class:  # the Priority admission plugin refuses a pod whose PriorityClass does not exist
        try:
            client.SchedulingV1Api(kube.api).create_priority_class({"metadata": {"name": priority_class}, "value": 10})
        except ApiException as error:
            if error.status != 409:
                raise
    wait_for(
        lambda: kube.core.read_namespaced_service_account("dry-trainer", namespace).secrets,
        what="the ServiceAccount's token",
    )
    for replica_type, replica in rendered["spec"]["pytorchReplicaSpecs"].items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"dry-{replica_type.lower()}-0", **replica["template"]["metadata"]},
            "spec": {**replica["template"]["spec"], "restartPolicy": "OnFailure"},
        }
        # Through plain JSON (the typed client would coerce the integer GPU quantities first).
        checked = OperatorKube(kube.api).request(
            "POST", f"/api/v1/namespaces/{namespace}/pods", pod, query={"dryRun": "All"}
        )
        assert checked["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert checked["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        template = replica["template"]["spec"]
        assert checked["spec"].get("affinity") == template.get("affinity")
        assert checked["spec"]["schedulerName"] == template.get("schedulerName", "default-scheduler")
        assert checked["spec"]["containers"][0].get("envFrom") == template["containers"][0].get("envFrom")
        # (1.20 adds the seccomp alpha annotation that mirrors seccompProfile.)
        annotations = checked["metadata"].get("annotations") or {}
        assert replica["template"]["metadata"].get("annotations", {}).items() <= annotations.items()
        # (plus the ServiceAccount token volume that admission adds)
        assert [v["name"] for v in checked["spec"]["volumes"]][: len(template["volumes"])] == [
            v["name"] for v in template["volumes"]
        ]


def test_pytorchjob_with_an_unknown_field_is_rejected_by_kubeflow_schema(kube: Kube, namespace: str) -> None:
    """The schema check above can fail: Kubeflow's CRD rejects a malformed PyTorchJob."""
    if not uses_real_kubeflow_crd():
        pytest.skip("Kubeflow's PyTorchJob CRD is not in ../shared/fixtures")
    bad = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "bad"},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": "one"}}},
    }
    with pytest.raises(ApiException) as error:
        kube.custom.create_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", bad, dry_run="All")
    assert error.value.status == 422


# --- bad ForgeJobs ------------------------------------------------------------------------------------------------

REJECTED_BY_API_SERVER: list[tuple[str, dict[str, Any], str]] = [
    ("missing model", {"model": None}, "spec.model"),
    ("unknown technique", {"technique": "dpo"}, "spec.technique"),
    ("domainPercent 0", {"data": {"domainPercent": 0, "domain": [{"uri": "s3://a/b"}]}}, "spec.data.domainPercent"),
    ("domainPercent 101", {"data": {"domainPercent": 101, "domain": [{"uri": "s3://a/b"}]}}, "spec.data.domainPercent"),
    ("no domain data", {"data": {"domain": []}}, "spec.data.domain"),
    ("learningRate word", {"training": {"learningRate": "fast"}}, "spec.training.learningRate"),
    ("nodes 0", {"resources": {"nodes": 0}}, "spec.resources.nodes"),
    ("negative gpus", {"resources": {"gpusPerNode": -1}}, "spec.resources.gpusPerNode"),
    ("zero weight", {"data": {"domain": [{"uri": "s3://a/b", "weight": 0}]}}, "spec.data.domain.weight"),
    ("selection typo", {"checkpoints": {"output": "s3://o/", "selection": "best"}}, "spec.checkpoints.selection"),
    (
        "bad quantity",
        {"resources": {"resources": {"limits": {"memory": "lots"}}}},
        "spec.resources.resources.limits.memory",
    ),
    ("zeroStage 4", {"training": {"zeroStage": 4}}, "spec.training.zeroStage"),
    ("gang of no pods", {"scheduling": {"gang": {"minAvailable": 0}}}, "spec.scheduling.gang.minAvailable"),
    (
        "relative mount path",
        {"resources": {"volumeMounts": [{"name": "d", "mountPath": "data"}]}},
        "spec.resources.volumeMounts.mountPath",
    ),
]

FLAGGED_BY_OPERATOR: list[tuple[str, dict[str, Any], str]] = [
    ("general data missing below 100%", {"data": {"domainPercent": 90, "general": []}}, "spec.data.general"),
    ("no general data to measure forgetting", {"data": {"domainPercent": 100, "general": []}}, "spec.eval.general"),
    ("http uri", {"model": {"base": "https://huggingface.co/meta-llama"}}, "spec.model.base"),
    ("relative path", {"checkpoints": {"output": "checkpoints/"}}, "spec.checkpoints.output"),
    (
        "duplicate source",
        {"data": {"domain": [{"uri": "s3://a/b"}, {"uri": "s3://a/b"}], "general": [{"uri": "s3://g/"}]}},
        "spec.data.domain[1].uri",
    ),
    ("learningRate too high", {"training": {"learningRate": "0.5"}}, "spec.training.learningRate"),
    ("lora block with sft", {"lora": {"rank": 8}}, "spec.lora"),
    ("eval never runs", {"eval": {"everySteps": 5000}}, "spec.eval.everySteps"),
    (
        "global batch below one micro-batch",
        {"training": {"globalBatchTokens": 1024, "microBatchSize": 2}},
        "spec.training.globalBatchTokens",
    ),
    ("reserved env", {"env": [{"name": "WORLD_SIZE", "value": "4"}]}, "spec.env[0].name"),
    (
        "gpu in resources",
        {"resources": {"resources": {"limits": {"nvidia.com/gpu": 8}}}},
        'spec.resources.resources.limits["nvidia.com/gpu"]',
    ),
    (
        "toleration Exists with value",
        {"resources": {"tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}},
        "spec.resources.tolerations[0].value",
    ),
    ("eval smaller than a sequence", {"eval": {"maxTokens": 512}}, "spec.eval.maxTokens"),
    (
        "Forge's own pod label",
        {"resources": {"podLabels": {"forge.dev/forgejob": "other"}}},
        'spec.resources.podLabels["forge.dev/forgejob"]',
    ),
]


def _bad(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    body = forgejob(name)
    for key, value in overrides.items():
        if value is None:
            body["spec"].pop(key)
        elif isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return body


@pytest.mark.parametrize(
    ("case", "overrides", "field"), REJECTED_BY_API_SERVER, ids=[c[0] for c in REJECTED_BY_API_SERVER]
)
def test_api_server_rejects_bad_forgejob(
    kube: Kube, namespace: str, case: str, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as error:
        kube.create_forgejob(namespace, _bad("bad", overrides))
    assert error.value.status == 422, case
    message = json.loads(error.value.body)["message"]
    assert field in message, f"{case}: {message}"


def test_operator_flags_bad_forgejobs_and_creates_nothing(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    names = {f"bad-{index}": case for index, case in enumerate(FLAGGED_BY_OPERATOR)}
    for name, (_, overrides, _) in names.items():
        kube.create_forgejob(namespace, _bad(name, overrides))
    long_name = "a" * 60
    kube.create_forgejob(namespace, forgejob(long_name))
    names[long_name] = ("name too long for Kubeflow's service names", {}, "metadata.name")
    for name, (case, _, field) in names.items():
        condition = wait_for(
            lambda name=name: (lambda c: c if c and c["status"] == "False" else None)(
                kube.condition(namespace, name, "Accepted")
            ),
            what=f"Accepted=False for {case}",
            context=operator_process.log_tail,
        )
        assert condition["reason"] == "InvalidSpec", case
        assert condition["message"].startswith(f"{field}:") or f"; {field}:" in condition["message"], (
            f"{case}: {condition['message']}"
        )
        assert condition["observedGeneration"] == 1
        assert kube.state(namespace, name) == "Invalid", case
        kube.wait_event(namespace, name, "InvalidSpec", kind="Warning", message=condition["message"])
    assert kube.pytorchjobs(namespace) == []
    config_maps = kube.core.list_namespaced_config_map(namespace).items
    assert [cm.metadata.name for cm in config_maps if cm.metadata.name.endswith("-config")] == []
    assert kube.core.list_namespaced_service_account(namespace).items == [] or all(
        sa.metadata.name == "default" for sa in kube.core.list_namespaced_service_account(namespace).items
    )


def test_fixing_an_invalid_spec_starts_the_job(kube: Kube, operator_process: OperatorProcess, namespace: str) -> None:
    kube.create_forgejob(namespace, _bad("fixme", {"model": {"base": "http://nowhere/model"}}))
    wait_state(kube, operator_process, namespace, "fixme", "Invalid")
    kube.patch_forgejob(namespace, "fixme", {"spec": {"model": {"base": "s3://models/llama-3.2-1b/"}}})
    wait_accepted(kube, operator_process, namespace, "fixme")
    assert kube.forgejob(namespace, "fixme")["status"]["observedGeneration"] == 2


# --- PyTorchJob status transitions --------------------------------------------------------------------------------


def test_conditions_follow_the_training_operator_to_success(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("ok"))
    wait_accepted(kube, operator_process, namespace, "ok")
    trainer_op = TrainingOperatorStatus(kube, namespace, "ok")

    trainer_op.created()
    wait_for(
        lambda: kube.condition(namespace, "ok", "Created"), what="Created mirrored", context=operator_process.log_tail
    )
    assert kube.state(namespace, "ok") == "Pending"

    trainer_op.running()
    wait_state(kube, operator_process, namespace, "ok", "Running")
    running = kube.condition(namespace, "ok", "Running")
    assert running is not None and running["reason"] == "PyTorchJobRunning"
    assert running["message"] == f"PyTorchJob {namespace}/ok is running."

    trainer_op.restarting()
    wait_state(kube, operator_process, namespace, "ok", "Restarting")
    assert kube.condition(namespace, "ok", "Running")["status"] == "False"  # type: ignore[index]
    assert kube.condition(namespace, "ok", "Restarting")["status"] == "True"  # type: ignore[index]

    trainer_op.running()
    wait_state(kube, operator_process, namespace, "ok", "Running")
    assert kube.condition(namespace, "ok", "Restarting")["status"] == "False"  # type: ignore[index]

    trainer_op.succeeded()
    wait_state(kube, operator_process, namespace, "ok", "Succeeded")
    succeeded = kube.condition(namespace, "ok", "Succeeded")
    assert succeeded is not None and succeeded["status"] == "True" and succeeded["reason"] == "PyTorchJobSucceeded"
    # The training operator keeps Running (now False) after Succeeded in its list: the state must not read it.
    pytorchjob = kube.pytorchjob(namespace, "ok")
    assert pytorchjob is not None
    assert [c["type"] for c in pytorchjob["status"]["conditions"]][-1] == "Succeeded"
    assert kube.condition(namespace, "ok", "Running")["status"] == "False"  # type: ignore[index]
    for expected in ("Running", "Restarting", "Succeeded"):
        kube.wait_event(namespace, "ok", expected)


def test_failed_pytorchjob_fails_the_forgejob(kube: Kube, operator_process: OperatorProcess, namespace: str) -> None:
    kube.create_forgejob(namespace, forgejob("doomed"))
    wait_accepted(kube, operator_process, namespace, "doomed")
    trainer_op = TrainingOperatorStatus(kube, namespace, "doomed")
    trainer_op.created()
    trainer_op.running()
    wait_state(kube, operator_process, namespace, "doomed", "Running")
    trainer_op.failed()
    wait_state(kube, operator_process, namespace, "doomed", "Failed")
    failed = kube.condition(namespace, "doomed", "Failed")
    assert failed is not None and failed["status"] == "True"
    assert "1 Master replica(s) failed" in failed["message"]
    kube.wait_event(namespace, "doomed", "Failed", kind="Warning")


def test_early_stop_reported_by_the_trainer(kube: Kube, operator_process: OperatorProcess, namespace: str) -> None:
    """The guard reports earlyStop, the trainer exits with its early-stop code, the PyTorchJob fails: the ForgeJob
    is EarlyStopped (not Failed), with the guard's reason, and an Event says why."""
    kube.create_forgejob(namespace, forgejob("stopped"))
    wait_accepted(kube, operator_process, namespace, "stopped")
    trainer_op = TrainingOperatorStatus(kube, namespace, "stopped")
    trainer_op.created()
    trainer_op.running()
    wait_state(kube, operator_process, namespace, "stopped", "Running")
    kube.patch_forgejob_status(
        namespace,
        "stopped",
        {
            "status": {
                "latest": {"forgettingPercent": 7.5, "domainGainPercent": 12.0},
                "earlyStop": {
                    "step": 120,
                    "reason": "LearningRateTooHigh",
                    "rule": "forgetting-slope",
                    "message": "forgetting 7.5% > budget 2% and rising with the cumulative learning rate",
                    "action": "stop",
                    "suggestion": {"learningRate": "1e-5", "domainPercent": 50},
                },
            }
        },
    )
    stopped = wait_for(
        lambda: kube.condition(namespace, "stopped", "EarlyStopped"),
        what="EarlyStopped condition",
        context=operator_process.log_tail,
    )
    assert (stopped["status"], stopped["reason"]) == ("True", "LearningRateTooHigh")
    assert stopped["message"] == (
        "the trainer's guard stopped the run at step 120 (rule forgetting-slope): forgetting 7.5% > budget 2% and "
        "rising with the cumulative learning rate; suggested for the next run: learningRate 1e-5, domainPercent 50"
    )
    _, _, message = kube.wait_event(namespace, "stopped", "EarlyStopped", kind="Warning")
    assert message.startswith("LearningRateTooHigh: the trainer's guard stopped the run at step 120")

    trainer_op.failed()  # exit code 10: the PyTorchJob fails
    wait_state(kube, operator_process, namespace, "stopped", "EarlyStopped")
    failed = kube.condition(namespace, "stopped", "Failed")
    assert failed is not None and (failed["status"], failed["reason"]) == ("False", "EarlyStopped")
    assert "1 Master replica(s) failed" in failed["message"]
    assert not any(reason == "Failed" for _, reason, _ in kube.events(namespace, "stopped"))
    forgetting = kube.condition(namespace, "stopped", "ForgettingWithinBudget")
    assert forgetting is not None and forgetting["status"] == "False"
    assert forgetting["reason"] == "ForgettingBudgetExceeded"


def test_forgetting_over_budget_is_flagged_with_what_to_change(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("forgetful", model={"base": "s3://models/llama-2-7b/"}))
    wait_accepted(kube, operator_process, namespace, "forgetful")
    resolved = kube.forgejob(namespace, "forgetful")["status"]["resolved"]
    # 2e-5 at 7B, 262144-token batch, general share 20% (domain factor 0.9).
    assert resolved["learningRate"] == "1.8e-5"
    kube.patch_forgejob_status(namespace, "forgetful", {"status": {"latest": {"forgettingPercent": 6.1}}})

    def flagged() -> dict[str, Any] | None:
        condition = kube.condition(namespace, "forgetful", "ForgettingWithinBudget")
        return condition if condition and condition["status"] == "False" else None

    condition = wait_for(flagged, what="ForgettingWithinBudget=False", context=operator_process.log_tail)
    assert condition["reason"] == "ForgettingBudgetExceeded"
    # 1.8e-5 x 2/6.1 = 5.9e-6; domainPercent 80 (general 20%) -> general 45%.
    assert condition["message"] == (
        "forgetting 6.1% > budget 2%: lower learningRate to 5.9e-6 or raise the general share to 45% "
        "(domainPercent 55) (action stop: the trainer's guard stops the run if this persists)"
    )
    kube.wait_event(namespace, "forgetful", "ForgettingBudgetExceeded", kind="Warning", message=condition["message"])
    kube.patch_forgejob_status(namespace, "forgetful", {"status": {"latest": {"forgettingPercent": 1.5}}})
    wait_for(
        lambda: (
            (kube.condition(namespace, "forgetful", "ForgettingWithinBudget") or {}).get("reason") == "WithinBudget"
        ),
        what="back within budget",
        context=operator_process.log_tail,
    )


# --- checkpoint selection -----------------------------------------------------------------------------------------

TRAINER_REPORT: dict[str, Any] = {
    "baseline": {"domainLoss": 2.0, "generalLoss": 1.6},
    "progress": {"step": 300, "totalSteps": 400, "tokens": 78643200, "percent": 75.0, "etaSeconds": 120.5},
    "latest": {
        "domainLoss": 1.5,
        "generalLoss": 1.66,
        "forgettingPercent": 3.75,
        "domainGainPercent": 25.0,
        "tokensPerSecond": 51234.5,
        "mfu": 0.41,
        "learningRate": 1.7e-5,
    },
    "checkpoints": [
        {
            "step": 100,
            "uri": "s3://acme/forge/sel/step-00000100/",
            "domainLoss": 1.8,
            "generalLoss": 1.61,
            "forgettingPercent": 0.625,
            "domainGainPercent": 10.0,
            "complete": True,
        },
        {
            "step": 200,
            "uri": "s3://acme/forge/sel/step-00000200/",
            "domainLoss": 1.6,
            "generalLoss": 1.62,
            "forgettingPercent": 1.25,
            "domainGainPercent": 20.0,
            "complete": True,
        },
        {
            "step": 300,
            "uri": "s3://acme/forge/sel/step-00000300/",
            "domainLoss": 1.5,
            "generalLoss": 1.66,
            "forgettingPercent": 3.75,
            "domainGainPercent": 25.0,
            "complete": True,
        },
        {
            "step": 400,
            "uri": "s3://acme/forge/sel/step-00000400/",
            "domainLoss": 1.4,
            "generalLoss": 1.61,
            "forgettingPercent": 0.625,
            "domainGainPercent": 30.0,
            "complete": False,
        },
    ],
}


@pytest.mark.parametrize(
    ("policy", "step", "front"),
    [("best-within-budget", 200, []), ("last", 300, []), ("pareto", 200, [100, 200, 300])],
    ids=["best-within-budget", "last", "pareto"],
)
def test_trainer_report_selects_a_checkpoint(
    kube: Kube, operator_process: OperatorProcess, namespace: str, policy: str, step: int, front: list[int]
) -> None:
    name = f"sel-{policy.replace('-', '')}"[:40]
    kube.create_forgejob(
        namespace,
        forgejob(name, checkpoints={"everySteps": 100, "output": "s3://acme/forge/sel/", "selection": policy}),
    )
    wait_accepted(kube, operator_process, namespace, name)
    kube.patch_forgejob_status(namespace, name, {"status": TRAINER_REPORT})
    selected = wait_for(
        lambda: (
            (kube.forgejob(namespace, name)["status"].get("selected") or {}).get("step") == step
            and kube.forgejob(namespace, name)["status"]["selected"]
        ),
        what=f"selected step {step} with {policy}",
        context=operator_process.log_tail,
    )
    assert selected["uri"] == f"s3://acme/forge/sel/step-{step:08d}/"
    assert selected["policy"] == policy
    status = kube.forgejob(namespace, name)["status"]
    reported = {c["step"]: c for c in TRAINER_REPORT["checkpoints"]}
    assert status.get("paretoFront", []) == [
        {
            "step": s,
            "uri": reported[s]["uri"],
            "kind": "checkpoint",
            "forgettingPercent": reported[s]["forgettingPercent"],
            "domainGainPercent": reported[s]["domainGainPercent"],
        }
        for s in front
    ]
    assert status["progress"] == TRAINER_REPORT["progress"], "the operator must not touch the trainer's fields"
    forgetting = kube.condition(namespace, name, "ForgettingWithinBudget")
    assert forgetting is not None and forgetting["status"] == "False"  # latest 3.75% > 2%
    kube.wait_event(namespace, name, "CheckpointSelected")


END_OF_RUN_CANDIDATES: list[dict[str, Any]] = [
    {
        "step": 300,
        "uri": f"s3://acme/forge/sel/step-00000300-wise-{alpha}/",
        "kind": "interpolation",
        "alpha": alpha,
        "forgettingPercent": forgetting,
        "domainGainPercent": gain,
        "complete": True,
    }
    for alpha, forgetting, gain in ((0.25, 0.4, 9.0), (0.5, 1.1, 21.5), (0.75, 2.4, 24.0))
] + [
    {
        "step": 300,
        "uri": "s3://acme/forge/sel/average-200-300/",
        "kind": "average",
        "averageOf": [200, 300],
        "forgettingPercent": 2.2,
        "domainGainPercent": 23.0,
        "complete": True,
    }
]


def test_end_of_run_candidates_are_selected_by_kind(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    """The trainer appends its end-of-run candidates; within the 2% budget the 0.5 interpolation beats every saved
    checkpoint (21.5% gain vs 20% for step 200), and the metrics follow."""
    kube.create_forgejob(namespace, forgejob("wise"))
    wait_accepted(kube, operator_process, namespace, "wise")
    kube.patch_forgejob_status(namespace, "wise", {"status": TRAINER_REPORT})
    wait_for(
        lambda: (kube.forgejob(namespace, "wise")["status"].get("selected") or {}).get("step") == 200,
        what="step 200 selected before the candidates",
        context=operator_process.log_tail,
    )
    checkpoints = [*TRAINER_REPORT["checkpoints"], *END_OF_RUN_CANDIDATES]
    written = kube.patch_forgejob_status(namespace, "wise", {"status": {"checkpoints": checkpoints}})
    assert written["status"]["checkpoints"] == checkpoints, "the CRD keeps kind, alpha and averageOf"
    selected = wait_for(
        lambda: (lambda s: s if s.get("kind") == "interpolation" else None)(
            kube.forgejob(namespace, "wise")["status"].get("selected") or {}
        ),
        what="the interpolation selected",
        context=operator_process.log_tail,
    )
    assert selected["uri"] == "s3://acme/forge/sel/step-00000300-wise-0.5/"
    assert (selected["step"], selected["alpha"], selected["policy"]) == (300, 0.5, "best-within-budget")
    assert selected["reason"].startswith("interpolation (alpha 0.5) of step 300 with the base model: largest domain")
    assert (selected["forgettingPercent"], selected["domainGainPercent"]) == (1.1, 21.5)
    kube.wait_event(namespace, "wise", "CheckpointSelected", message=f"{selected['uri']}: {selected['reason']}")

    text = wait_for(
        lambda: (
            lambda t: (
                t if f'forge_forgejob_selected_step{{forge_job="wise",namespace="{namespace}"}} 300.0' in t else None
            )
        )(operator_process.metrics()),
        what="forge_forgejob_selected_step for wise",
    )
    assert f'forge_forgejob_checkpoints{{forge_job="wise",namespace="{namespace}"}} 3.0' in text  # 400 is incomplete


def test_printer_columns_show_state_step_forgetting_selected(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("table"))
    wait_accepted(kube, operator_process, namespace, "table")
    kube.patch_forgejob_status(namespace, "table", {"status": TRAINER_REPORT})
    wait_for(lambda: kube.forgejob(namespace, "table")["status"].get("selected"), what="selection")
    response = kube.api.call_api(
        *kube.api.param_serialize(
            "GET",
            f"/apis/forge.dev/v1alpha1/namespaces/{namespace}/forgejobs",
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
            auth_settings=["BearerToken"],
        )[:4]
    )
    table = json.loads(response.read())
    columns = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert columns == ["Name", "State", "Step", "Forgetting", "Selected", "Age"]
    row = table["rows"][0]["cells"]
    assert row[:5] == ["table", "Pending", 300, 3.75, 200]


# --- suspend, spec changes, deletion ------------------------------------------------------------------------------


def test_suspend_and_resume(kube: Kube, operator_process: OperatorProcess, namespace: str) -> None:
    kube.create_forgejob(namespace, forgejob("pause"))
    wait_accepted(kube, operator_process, namespace, "pause")
    trainer_op = TrainingOperatorStatus(kube, namespace, "pause")
    trainer_op.created()
    trainer_op.running()
    wait_state(kube, operator_process, namespace, "pause", "Running")

    kube.patch_forgejob(namespace, "pause", {"spec": {"suspend": True}})
    wait_for(
        lambda: (kube.pytorchjob(namespace, "pause") or {})["spec"]["runPolicy"].get("suspend") is True,
        what="runPolicy.suspend true",
        context=operator_process.log_tail,
    )
    trainer_op.suspended()
    wait_state(kube, operator_process, namespace, "pause", "Suspended")
    accepted = kube.condition(namespace, "pause", "Accepted")
    assert accepted is not None and accepted["status"] == "True" and accepted["observedGeneration"] == 2

    kube.patch_forgejob(namespace, "pause", {"spec": {"suspend": False}})
    wait_for(
        lambda: (kube.pytorchjob(namespace, "pause") or {})["spec"]["runPolicy"].get("suspend") is False,
        what="runPolicy.suspend false",
        context=operator_process.log_tail,
    )
    trainer_op.resumed()
    trainer_op.running()
    wait_state(kube, operator_process, namespace, "pause", "Running")
    suspended = kube.condition(namespace, "pause", "Suspended")
    assert suspended is not None and suspended["status"] == "False" and suspended["reason"] == "PyTorchJobResumed"
    kube.wait_event(namespace, "pause", "Suspending")
    kube.wait_event(namespace, "pause", "Resuming")
    assert len(kube.pytorchjobs(namespace)) == 1


def test_other_spec_changes_after_start_are_refused(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("frozen"))
    before = wait_accepted(kube, operator_process, namespace, "frozen")
    config_before = kube.core.read_namespaced_config_map("frozen-config", namespace).data

    kube.patch_forgejob(
        namespace, "frozen", {"spec": {"training": {"learningRate": "1e-4"}, "data": {"seqLength": 2048}}}
    )

    def refused() -> dict[str, Any] | None:
        condition = kube.condition(namespace, "frozen", "Accepted")
        return condition if condition and condition["reason"] == "SpecChangeRefused" else None

    condition = wait_for(refused, what="SpecChangeRefused", context=operator_process.log_tail)
    assert condition["status"] == "False" and condition["observedGeneration"] == 2
    assert "spec.data.seqLength" in condition["message"] and "spec.training.learningRate" in condition["message"]
    assert "only spec.suspend and spec.checkpoints.selection may change" in condition["message"]
    after = kube.pytorchjob(namespace, "frozen")
    assert after is not None and after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"] == before["spec"]
    assert kube.core.read_namespaced_config_map("frozen-config", namespace).data == config_before
    kube.wait_event(namespace, "frozen", "SpecChangeRefused", kind="Warning", message=condition["message"])

    kube.patch_forgejob(
        namespace, "frozen", {"spec": {"training": {"learningRate": "auto"}, "data": {"seqLength": 1024}}}
    )
    wait_for(
        lambda: (kube.condition(namespace, "frozen", "Accepted") or {}).get("status") == "True",
        what="Accepted again after the revert",
        context=operator_process.log_tail,
    )
    kube.patch_forgejob(namespace, "frozen", {"spec": {"checkpoints": {"selection": "last"}}})
    accepted = wait_accepted_generation(kube, operator_process, namespace, "frozen", 4)
    assert accepted["status"] == "True", "the selection policy may change at any time"


def test_a_run_started_under_an_older_default_stays_accepted_after_an_upgrade(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("upgraded"))  # sft, data.mixBy not named
    wait_accepted(kube, operator_process, namespace, "upgraded")
    config_map = kube.core.read_namespaced_config_map("upgraded-config", namespace)
    recorded = json.loads(config_map.data[ACCEPTED_SPEC_KEY])
    assert recorded["data"]["mixBy"] is None
    recorded["data"]["mixBy"] = "tokens"  # what an operator from before the technique-dependent default recorded
    kube.core.patch_namespaced_config_map(
        "upgraded-config", namespace, {"data": {ACCEPTED_SPEC_KEY: canonical_json(recorded) + "\n"}}
    )

    kube.patch_forgejob(namespace, "upgraded", {"spec": {"checkpoints": {"selection": "last"}}})
    accepted = wait_accepted_generation(kube, operator_process, namespace, "upgraded", 2)
    assert accepted["status"] == "True", accepted
    resolved = (kube.forgejob(namespace, "upgraded") or {})["status"]["resolved"]
    assert not any(note.startswith("data.mixBy") for note in resolved["notes"]), "resolved from the accepted spec"


def test_delete_removes_children_through_garbage_collection(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("gone"))
    wait_accepted(kube, operator_process, namespace, "gone")
    wait_for(lambda: all(children(kube, namespace, "gone").values()), what="every child")
    kube.custom.delete_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", "gone")
    wait_for(
        lambda: not any(children(kube, namespace, "gone").values()),
        timeout=60,
        what="children garbage-collected",
        context=lambda: f"left: {[k for k, v in children(kube, namespace, 'gone').items() if v]}",
    )


def test_pytorchjob_deleted_mid_run_is_recreated_but_not_after_the_end(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("phoenix"))
    first = wait_accepted(kube, operator_process, namespace, "phoenix")
    kube.custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", "phoenix")
    second = wait_for(
        lambda: (lambda j: j if j and j["metadata"]["uid"] != first["metadata"]["uid"] else None)(
            kube.pytorchjob(namespace, "phoenix")
        ),
        what="the PyTorchJob re-created",
        context=operator_process.log_tail,
    )
    assert second["spec"] == first["spec"]
    kube.wait_event(namespace, "phoenix", "ChildRecreated", kind="Warning")

    trainer_op = TrainingOperatorStatus(kube, namespace, "phoenix")
    trainer_op.created()
    trainer_op.running()
    trainer_op.succeeded()
    wait_state(kube, operator_process, namespace, "phoenix", "Succeeded")
    kube.custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", "phoenix")
    wait_for(lambda: kube.pytorchjob(namespace, "phoenix") is None, what="PyTorchJob gone")
    # Like ttlSecondsAfterFinished: a finished run is never started again; its status stays.
    kube.patch_forgejob(namespace, "phoenix", {"metadata": {"labels": {"touched": "yes"}}})
    kube.patch_forgejob_status(namespace, "phoenix", {"status": {"progress": {"step": 400}}})
    wait_for(lambda: kube.forgejob(namespace, "phoenix")["status"]["progress"]["step"] == 400, what="report")
    assert kube.pytorchjob(namespace, "phoenix") is None
    assert kube.state(namespace, "phoenix") == "Succeeded"


def test_operator_metrics(kube: Kube, operator_process: OperatorProcess, namespace: str) -> None:
    kube.create_forgejob(namespace, forgejob("metered"))
    kube.create_forgejob(namespace, _bad("metered-bad", {"model": {"base": "ftp://x/y"}}))
    wait_accepted(kube, operator_process, namespace, "metered")
    wait_state(kube, operator_process, namespace, "metered-bad", "Invalid")
    text = wait_for(
        lambda: (lambda t: t if 'forge_forgejobs{state="Invalid"}' in t else None)(operator_process.metrics()),
        what="metrics",
    )
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert samples['forge_forgejobs{state="Invalid"}'] >= 1
    assert samples['forge_forgejobs{state="Pending"}'] >= 1
    assert samples['forge_reconcile_duration_seconds_count{handler="reconcile"}'] >= 2
    assert samples['forge_reconcile_errors_total{kind="invalid_spec"}'] >= 1
    assert samples['forge_children_created_total{kind="PyTorchJob"}'] >= 1
    assert not any(re.search(r'[{,]job="', key) for key in samples), "a label named job would be renamed on scrape"
    assert any(key.startswith("forge_forgejob_checkpoints{forge_job=") for key in samples)


# --- the trainer's credentials ------------------------------------------------------------------------------------


def trainer_client(cluster: LocalCluster, kube: Kube, namespace: str, account: str) -> client.ApiClient:
    """An API client holding a TokenRequest token of the trainer's ServiceAccount (what its pods would get)."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=["https://kubernetes.default.svc"], expiration_seconds=600)
    )
    token = kube.core.create_namespaced_service_account_token(account, namespace, request).status.token
    configuration = client.Configuration(host=cluster.server, api_key={"BearerToken": token})
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    configuration.verify_ssl = False
    return client.ApiClient(configuration)


def test_trainer_credentials_patch_only_their_own_forgejob_status(
    cluster: LocalCluster, kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    kube.create_forgejob(namespace, forgejob("mine"))
    kube.create_forgejob(namespace, forgejob("theirs"))
    wait_accepted(kube, operator_process, namespace, "mine")
    wait_accepted(kube, operator_process, namespace, "theirs")
    wait_for(lambda: all(children(kube, namespace, "mine").values()), what="mine's RBAC")
    with trainer_client(cluster, kube, namespace, "mine-trainer") as api:
        trainer = client.CustomObjectsApi(api)
        report = {"status": {"progress": {"step": 7, "totalSteps": 400, "percent": 1.75}}}
        trainer.patch_namespaced_custom_object_status("forge.dev", "v1alpha1", namespace, "forgejobs", "mine", report)
        assert kube.forgejob(namespace, "mine")["status"]["progress"]["step"] == 7
        assert trainer.get_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", "mine")

        forbidden = [
            lambda: trainer.patch_namespaced_custom_object_status(
                "forge.dev", "v1alpha1", namespace, "forgejobs", "theirs", report
            ),
            lambda: trainer.get_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", "theirs"),
            lambda: trainer.patch_namespaced_custom_object(
                "forge.dev", "v1alpha1", namespace, "forgejobs", "mine", {"spec": {"suspend": True}}
            ),
            lambda: trainer.list_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs"),
            lambda: trainer.delete_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", "mine"),
        ]
        for attempt in forbidden:
            with pytest.raises(ApiException) as error:
                attempt()
            assert error.value.status == 403
    assert "progress" not in (kube.forgejob(namespace, "theirs").get("status") or {})
    assert kube.forgejob(namespace, "mine")["spec"]["suspend"] is False


def test_a_foreign_object_with_a_child_name_is_never_overwritten(
    kube: Kube, operator_process: OperatorProcess, namespace: str
) -> None:
    foreign = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="squatted-config"), data={"mine": "yes"})
    kube.core.create_namespaced_config_map(namespace, foreign)
    kube.create_forgejob(namespace, forgejob("squatted"))

    def conflict() -> dict[str, Any] | None:
        condition = kube.condition(namespace, "squatted", "Accepted")
        return condition if condition and condition["reason"] == "ChildConflict" else None

    condition = wait_for(conflict, what="ChildConflict", context=operator_process.log_tail)
    assert condition["status"] == "False" and "squatted-config" in condition["message"]
    assert kube.core.read_namespaced_config_map("squatted-config", namespace).data == {"mine": "yes"}
    assert kube.pytorchjob(namespace, "squatted") is None
    kube.core.delete_namespaced_config_map("squatted-config", namespace)
    job = wait_for(
        lambda: kube.pytorchjob(namespace, "squatted"), timeout=45, what="PyTorchJob after the conflict cleared"
    )
    assert job["metadata"]["ownerReferences"][0]["name"] == "squatted"
    config_map = kube.core.read_namespaced_config_map("squatted-config", namespace)
    assert "config.json" in config_map.data
