"""Kubeflow Trainer v2 for the stand-in: a TrainJob and its ClusterTrainingRuntime -> the node pods to run, the
environment the torch runtime gives them, and the TrainJob status the Trainer controller writes. Pure functions.

What Trainer v2 does, reduced to what a local run needs:

- the runtime's replicated job ``node`` (its pod template, container ``node``: the trainer, labelled
  ``trainer.kubeflow.org/trainjob-ancestor-step: trainer``) runs ``spec.trainer.numNodes`` pods;
- the TrainJob's ``trainer`` sets that container's image, command, args, env (merged by name) and resources;
- ``spec.runtimePatches`` patch the pod template: metadata labels and annotations, serviceAccountName, volumes,
  node selection, security contexts, pull secrets, and per container env, volumeMounts and securityContext;
- the torch plugin adds PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's completion index), PET_MASTER_ADDR
  (``<job>-node-0-0.<job>``, here loopback) and PET_MASTER_PORT (29400 on a cluster, here a free port): torchrun
  reads them and starts the local ranks;
- status: conditions Created (JobsCreationSucceeded), Suspended (Suspended/Resumed), Complete (the JobSet's
  AllJobsCompleted) or Failed (FailedJobs, DeadlineExceeded), and ``jobsStatus`` for the one child Job ``node``.

The node pods become the stand-in's replicas ``worker-0`` .. ``worker-<n-1>`` (node rank = index): the internal
model is the PyTorchJob one, so processes, volumes, credentials and logs work the same for both kinds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from forge_dev.standin.spec import DEFAULT_CONTAINER_NAME, WORKER, JobSpecError, PyTorchJob
from forge_dev.standin.status import Condition, Observation

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
RUNTIME_PLURAL = "clustertrainingruntimes"
NODE = "node"
# Merged into the trainer container by name; lists of objects keyed by "name" in the pod spec patch.
_KEYED_LISTS = ("volumes", "imagePullSecrets", "tolerations")
_POD_FIELDS = (
    "serviceAccountName",
    "nodeSelector",
    "affinity",
    "securityContext",
    "tolerations",
    "terminationGracePeriodSeconds",
)

CREATED = "Created"
SUSPENDED = "Suspended"
COMPLETE = "Complete"
FAILED = "Failed"


def runtime_name(obj: Mapping[str, Any]) -> str:
    """The ClusterTrainingRuntime a TrainJob references (only that kind is run here)."""
    ref = (obj.get("spec") or {}).get("runtimeRef") or {}
    kind = ref.get("kind", "ClusterTrainingRuntime")
    if kind != "ClusterTrainingRuntime" or ref.get("apiGroup", GROUP) != GROUP:
        raise JobSpecError(f"runtimeRef {kind} {ref.get('name')!r}: the stand-in runs ClusterTrainingRuntimes only")
    name = ref.get("name")
    if not name:
        raise JobSpecError("spec.runtimeRef.name is empty")
    return str(name)


def _by_name(items: list[dict[str, Any]], patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Strategic-merge of a list keyed by name: a patched entry replaces the same name, new ones are appended."""
    merged = {item.get("name"): item for item in items}
    for item in patch:
        merged[item.get("name")] = item
    return list(merged.values())


def _merge_container(container: dict[str, Any], patch: Mapping[str, Any]) -> None:
    if "env" in patch:
        container["env"] = _by_name(container.get("env") or [], list(patch["env"]))
    if "volumeMounts" in patch:
        container["volumeMounts"] = _by_name(container.get("volumeMounts") or [], list(patch["volumeMounts"]))
    if "securityContext" in patch:
        container["securityContext"] = {**(container.get("securityContext") or {}), **patch["securityContext"]}


def node_template(obj: Mapping[str, Any], runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The pod template of the TrainJob's node pods: the runtime's, with the trainer fields and runtime patches."""
    replicated = _node_job(runtime)
    if not replicated:
        raise JobSpecError(f"the runtime {runtime_name(obj)!r} has no replicated job {NODE!r}")
    template = copy.deepcopy(((replicated.get("template") or {}).get("spec") or {}).get("template") or {})
    pod = template.setdefault("spec", {})
    containers = pod.setdefault("containers", [])
    trainer_container = next((c for c in containers if c.get("name") == NODE), None)
    if trainer_container is None:
        raise JobSpecError(f"the runtime's replicated job {NODE!r} has no container {NODE!r}")
    trainer = (obj.get("spec") or {}).get("trainer") or {}
    for key in ("image", "command", "args"):
        if key in trainer:
            trainer_container[key] = trainer[key]
    if "env" in trainer:
        trainer_container["env"] = _by_name(trainer_container.get("env") or [], list(trainer["env"]))
    if "resourcesPerNode" in trainer:
        trainer_container["resources"] = trainer["resourcesPerNode"]
    for patch in (obj.get("spec") or {}).get("runtimePatches") or []:
        spec_patch = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for job_patch in spec_patch.get("replicatedJobs") or []:
            if job_patch.get("name") != NODE:
                continue
            pod_patch = ((job_patch.get("template") or {}).get("spec") or {}).get("template") or {}
            metadata = template.setdefault("metadata", {})
            for key in ("labels", "annotations"):
                if (pod_patch.get("metadata") or {}).get(key):
                    metadata[key] = {**(metadata.get(key) or {}), **pod_patch["metadata"][key]}
            patch_spec = pod_patch.get("spec") or {}
            for key in _POD_FIELDS:
                if key in patch_spec and key not in _KEYED_LISTS:
                    pod[key] = patch_spec[key]
            for key in _KEYED_LISTS:
                if key in patch_spec:
                    pod[key] = _by_name(pod.get(key) or [], list(patch_spec[key]))
            for container_patch in patch_spec.get("containers") or []:
                target = next((c for c in containers if c.get("name") == container_patch.get("name")), None)
                if target is None:
                    raise JobSpecError(
                        f"runtime patch for container {container_patch.get('name')!r}: no such container"
                    )
                _merge_container(target, container_patch)
    # The stand-in's replicas run the container it knows by name: the trainer container, renamed.
    trainer_container["name"] = DEFAULT_CONTAINER_NAME
    return template


def _node_job(runtime: Mapping[str, Any]) -> dict[str, Any]:
    jobs = ((runtime.get("spec") or {}).get("template") or {}).get("spec", {}).get("replicatedJobs") or []
    return next((dict(job) for job in jobs if job.get("name") == NODE), {})


def as_pytorchjob(obj: Mapping[str, Any], runtime: Mapping[str, Any]) -> PyTorchJob:
    """The stand-in's internal model of a TrainJob: ``numNodes`` replicas ``worker-<i>`` of the node template.

    Restarts follow the runtime's node Job (its pod restartPolicy and backoffLimit); where the runtime sets
    neither (torch-distributed) no node is restarted and the first failed node fails the TrainJob.
    """
    spec = obj.get("spec") or {}
    trainer = spec.get("trainer") or {}
    job_spec = (_node_job(runtime).get("template") or {}).get("spec") or {}
    template = node_template(obj, runtime)
    nodes = trainer.get("numNodes") or ((runtime.get("spec") or {}).get("mlPolicy") or {}).get("numNodes") or 1
    try:
        return PyTorchJob.model_validate(
            {
                "metadata": obj.get("metadata") or {},
                "spec": {
                    "pytorchReplicaSpecs": {
                        WORKER: {
                            "replicas": int(nodes),
                            "restartPolicy": (template.get("spec") or {}).get("restartPolicy") or "Never",
                            "template": template,
                        }
                    },
                    "runPolicy": {
                        "backoffLimit": job_spec.get("backoffLimit", 0),
                        "suspend": bool(spec.get("suspend", False)),
                        "activeDeadlineSeconds": spec.get("activeDeadlineSeconds"),
                    },
                },
                "status": obj.get("status") or {},
            }
        )
    except ValueError as error:
        raise JobSpecError(f"cannot read TrainJob: {error}") from error


def num_proc_per_node(obj: Mapping[str, Any], runtime: Mapping[str, Any]) -> int:
    """numProcPerNode of the TrainJob, else the runtime's torch policy's, else 1."""
    trainer = (obj.get("spec") or {}).get("trainer") or {}
    torch = ((runtime.get("spec") or {}).get("mlPolicy") or {}).get("torch") or {}
    value = trainer.get("numProcPerNode") or torch.get("numProcPerNode") or 1
    return int(value) if str(value).isdigit() else 1


def torch_environment(nnodes: int, nproc: int, node_rank: int, master_port: int) -> list[tuple[str, str]]:
    """What Trainer v2's torch plugin gives the trainer container (the master address is loopback here)."""
    return [
        ("PET_NNODES", str(nnodes)),
        ("PET_NPROC_PER_NODE", str(nproc)),
        ("PET_NODE_RANK", str(node_rank)),
        ("PET_MASTER_ADDR", "127.0.0.1"),
        ("PET_MASTER_PORT", str(master_port)),
    ]


def is_finished(conditions: list[Condition]) -> bool:
    return any(c.get("type") in (COMPLETE, FAILED) and c.get("status") == "True" for c in conditions)


def _set(conditions: list[Condition], ctype: str, status: str, reason: str, message: str, now: str) -> list[Condition]:
    """meta.SetStatusCondition: lastTransitionTime moves only when the status changes."""
    current = next((c for c in conditions if c.get("type") == ctype), None)
    if current is not None and (current.get("status"), current.get("reason"), current.get("message")) == (
        status,
        reason,
        message,
    ):
        return conditions
    transition = current.get("lastTransitionTime", now) if current and current.get("status") == status else now
    new = {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": transition}
    return [*(c for c in conditions if c.get("type") != ctype), new]


def next_status(current: Mapping[str, Any], observation: Observation, now: str) -> dict[str, Any]:
    """The TrainJob status to write (equal to ``current`` when nothing changed)."""
    status = copy.deepcopy(dict(current))
    conditions: list[Condition] = list(status.get("conditions") or [])
    if is_finished(conditions):
        return status
    conditions = _set(conditions, CREATED, "True", "JobsCreationSucceeded", "succeeded to create Jobs", now)
    if observation.suspended:
        conditions = _set(conditions, SUSPENDED, "True", "Suspended", "TrainJob is suspended", now)
    elif any(c.get("type") == SUSPENDED and c.get("status") == "True" for c in conditions):
        conditions = _set(conditions, SUSPENDED, "False", "Resumed", "TrainJob is resumed", now)
    counts = observation.replicas.get(WORKER)
    active = 0 if observation.suspended or counts is None else counts.active
    outcome = observation.outcome
    ready = 1 if observation.running and outcome is None and not observation.suspended else 0
    status["jobsStatus"] = [
        {
            "name": NODE,
            "active": 1 if active else 0,
            "ready": ready,
            "succeeded": 1 if outcome is not None and outcome.ctype == "Succeeded" else 0,
            "failed": 1 if outcome is not None and outcome.ctype == "Failed" else 0,
            "suspended": 1 if observation.suspended else 0,
        }
    ]
    if outcome is not None:
        if outcome.ctype == "Succeeded":
            conditions = _set(conditions, COMPLETE, "True", "AllJobsCompleted", "jobset completed successfully", now)
        elif "deadline" in outcome.message:
            message = "TrainJob was active longer than specified deadline"
            conditions = _set(conditions, FAILED, "True", "DeadlineExceeded", message, now)
        else:
            conditions = _set(conditions, FAILED, "True", "FailedJobs", failed_message(outcome.message), now)
    status["conditions"] = conditions
    return status


def failed_message(detail: str) -> str:
    """The JobSet's failure, in Trainer's words; the detail names the failed node (the stand-in's message)."""
    return f"jobset failed due to a failed node Job: {detail.replace('PyTorchJob', 'TrainJob')}"
