"""Pure builders: a ForgeJob (spec + resolved values) -> the trainer config and every child object.

Nothing here talks to the API server; every function returns plain JSON-ready dicts. Children have deterministic
names derived from the ForgeJob's name, so a builder that runs twice describes the same object (idempotence).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from forge_operator.api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ApiModel,
    ForgeJobSpec,
    LoraSpec,
    Resolved,
    Source,
)
from forge_operator.defaults import eval_every_steps, mix_by, parse_decimal, zero_stage

TRAINER_CONFIG_VERSION = 1
CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/forge"
SCRATCH_DIR = "/tmp/forge"
TMP_DIR = "/tmp"
CHECKPOINT_LOCAL_DIR = f"{SCRATCH_DIR}/checkpoints"
TRAINER_COMMAND = "forge-trainer"
PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT_NAME = "pytorchjob-port"
PYTORCH_PORT = 23456
GPU_RESOURCE = "nvidia.com/gpu"
PYTORCHJOB_API_VERSION = "kubeflow.org/v1"
PYTORCHJOB_KIND = "PyTorchJob"
# Kubeflow Trainer v2 (trainer.kubeflow.org): a TrainJob runs on a (Cluster)TrainingRuntime, a JobSet template whose
# trainer container (torch runtimes: replicated job and container "node") gets the image, command, env and
# resources of the TrainJob, and its pod-template overrides through spec.runtimePatches.
TRAINJOB_API_VERSION = "trainer.kubeflow.org/v1alpha1"
TRAINJOB_KIND = "TrainJob"
TRAINER_GROUP = "trainer.kubeflow.org"
DEFAULT_TRAINING_RUNTIME = "torch-distributed"
TRAINJOB_NODE = "node"
"""The replicated job and the trainer container of Kubeflow's torch runtimes."""
RUNTIME_PATCH_MANAGER = "forge.dev/forge-operator"
# The torch runtimes give every node PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
# PET_MASTER_PORT, which torchrun would read; forge-trainer reads them itself (forge_trainer.launch).
MANAGED_BY = "forge-operator"
JOB_LABEL = "forge.dev/forgejob"
SPEC_DIGEST_ANNOTATION = "forge.dev/spec-digest"
# The spec the run was accepted with lives in the ConfigMap's data (it holds the literal env values, which never go
# into annotations); ConfigMaps of operators before 0.x kept it in this annotation, still read as a fallback.
ACCEPTED_SPEC_KEY = "accepted-spec.json"
ACCEPTED_SPEC_ANNOTATION = "forge.dev/accepted-spec"
# The last spec.suspend the operator wrote to runPolicy.suspend: the field is written again only when spec.suspend
# differs from it, so a queue manager (Kueue) owns runPolicy.suspend in between.
SUSPEND_ANNOTATION = "forge.dev/suspend-requested"
# Keeps a deleted PyTorchJob readable until the operator has mirrored its final conditions (e.g. deleted by
# ttlSecondsAfterFinished while the operator was down): a finished run is then never started again.
FINAL_STATUS_FINALIZER = "forge.dev/final-status"
# Kueue's contract for jobs it manages (kueue.x-k8s.io labels on the job's metadata).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
# spec fields that may change after the PyTorchJob exists (pydantic exclude form); every other change is refused.
MUTABLE_SPEC_FIELDS: dict[str, Any] = {
    "suspend": True,
    "checkpoints": {"selection": True, "budget_confidence_percent": True},
}


@dataclass(frozen=True)
class Owner:
    """The ForgeJob that owns the children (its uid makes the ownerReference)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide settings that shape the children (from the FORGE_* environment)."""

    trainer_image: str | None = None
    trainer_metrics_port: int = 9400
    report_min_interval_seconds: int = 30
    trainer_resources: dict[str, dict[str, int | str]] = field(default_factory=dict)
    """Default {limits, requests} of the trainer container, for ForgeJobs that set no spec.resources.resources."""
    trainer_image_pull_policy: str | None = None
    """Default imagePullPolicy of the trainer container, for ForgeJobs that set no spec.resources.imagePullPolicy."""
    training_runtime: str = DEFAULT_TRAINING_RUNTIME
    """Default ClusterTrainingRuntime of TrainJobs, for ForgeJobs that set no spec.trainingRuntime."""
    restricted: bool = True
    """Trainer pods meet Pod Security "restricted" (non-root, RuntimeDefault seccomp, no privilege escalation, no
    capabilities, read-only root filesystem with /tmp and the scratch folder writable)."""


def config_map_name(job: str) -> str:
    return f"{job}-config"


def trainer_account_name(job: str) -> str:
    """Name of the trainer's ServiceAccount, Role and RoleBinding."""
    return f"{job}-trainer"


def pytorchjob_name(job: str) -> str:
    return job


def labels(job: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "forge-trainer",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "forge",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_LABEL: job,
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(owner: Owner, name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name),
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return metadata


# --- the accepted spec -------------------------------------------------------------------------------------------


def frozen_spec(spec: ForgeJobSpec) -> dict[str, Any]:
    """The part of the spec that may not change once the job started, in canonical JSON form."""
    return spec.model_dump(mode="json", by_alias=True, exclude=MUTABLE_SPEC_FIELDS)


def keep_started_choices(accepted: ForgeJobSpec, current: ForgeJobSpec) -> ForgeJobSpec:
    """``current`` with the fields it leaves to the operator filled from the spec the run started with.

    A started run keeps the choice it started with, so a field left unset is no change even where the operator
    now chooses differently: before data.mixBy depended on the technique, an accepted spec recorded `tokens` for
    every job, and an operator upgrade must not refuse a running sft job whose spec never named it.
    """
    if current.data.mix_by is None and accepted.data.mix_by is not None:
        data = current.data.model_copy(update={"mix_by": accepted.data.mix_by})
        return current.model_copy(update={"data": data})
    return current


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def spec_digest(spec: ForgeJobSpec) -> str:
    return hashlib.sha256(canonical_json(frozen_spec(spec)).encode()).hexdigest()[:20]


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Field paths whose values differ between two JSON documents (lists compared as a whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[str] = []
        for key in sorted(set(old) | set(new)):
            paths += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return paths
    return [] if old == new else [prefix]


# --- the trainer config (the contract with forge_trainer.config) ------------------------------------------------


# Positions per loss chunk on GPUs: benchmarks/trainer_loss_chunks.py (docs/trainer.md, "Step loop performance").
GPU_LOSS_CHUNK_TOKENS = 1024


def resolved_compile(spec: ForgeJobSpec) -> bool:
    """training.compile, or its default: on with GPUs, off on CPU."""
    if spec.training.compile is not None:
        return spec.training.compile
    return spec.resources.gpus_per_node > 0


def resolved_loss_chunk_tokens(spec: ForgeJobSpec) -> int:
    """training.lossChunkTokens, or its default: the chunked loss with GPUs (not under ZeRO-3), full logits on CPU."""
    if spec.training.loss_chunk_tokens is not None:
        return spec.training.loss_chunk_tokens
    on_gpu = spec.resources.gpus_per_node > 0
    return GPU_LOSS_CHUNK_TOKENS if on_gpu and zero_stage(spec) < 3 else 0


def _sources(sources: list[Source]) -> list[dict[str, Any]]:
    return [{"uri": s.uri, "weight": s.weight} for s in sources]


def grace_steps(spec: ForgeJobSpec) -> int:
    """The guard's grace period in steps: ceil(maxSteps * gracePercent / 100), as the trainer's own default does."""
    return -(-spec.training.max_steps * spec.forgetting.grace_percent // 100)


def _forgetting(spec: ForgeJobSpec) -> dict[str, Any]:
    """The guard's settings; factors are integers in the spec and floats in the trainer config."""
    forgetting = spec.forgetting
    return {
        "budgetPercent": float(forgetting.budget_percent),
        "action": forgetting.action,
        "confidencePercent": spec.checkpoints.budget_confidence_percent,
        "graceSteps": grace_steps(spec),
        "graceEvals": forgetting.grace_evals,
        "slopeWindowEvals": forgetting.slope_window_evals,
        "lrTooHighFactor": float(forgetting.lr_too_high_factor),
        "noProgressEvals": forgetting.no_progress_evals,
        "divergenceFactor": float(forgetting.divergence_factor),
        "gradSpikeFactor": float(forgetting.grad_spike_factor),
        "gradSpikeSteps": forgetting.grad_spike_steps,
    }


def _probe(spec: ForgeJobSpec) -> dict[str, Any] | None:
    """The learning-rate probe's settings; multiples are integer percents in the spec and factors in the config."""
    probe = spec.training.learning_rate_probe
    if probe is None:
        return None
    return {
        "multipliers": [percent / 100 for percent in probe.multiplier_percents],
        "steps": probe.steps,
        "evaluations": probe.evaluations,
        "evalMaxTokens": min(probe.eval_max_tokens, spec.eval.max_tokens),
    }


def build_trainer_config(
    owner: Owner, spec: ForgeJobSpec, resolved: Resolved, options: RenderOptions
) -> dict[str, Any]:
    """The trainer config document (camelCase JSON) that ``forge_trainer.config.load_config`` parses."""
    model: dict[str, Any] = {
        "base": spec.model.base,
        "technique": spec.technique,
        "attentionImplementation": spec.model.attention_implementation,
    }
    if spec.technique == "lora":
        lora = spec.lora if spec.lora is not None else LoraSpec()
        model["lora"] = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout_percent / 100,
            "targetModules": list(lora.target_modules),
        }
    training = spec.training
    candidates = spec.checkpoints.candidates
    config: dict[str, Any] = {
        "version": TRAINER_CONFIG_VERSION,
        "jobName": owner.name,
        "namespace": owner.namespace,
        "model": model,
        "data": {
            "domainPercent": spec.data.domain_percent,
            "domain": _sources(spec.data.domain),
            "general": _sources(spec.data.general),
            "seqLength": spec.data.seq_length,
            "maxRepetition": float(spec.data.max_repetition),
            "maxBadLines": spec.data.max_bad_lines,
            "mixBy": mix_by(spec),
            "crossDocumentAttention": spec.data.cross_document_attention,
        },
        "eval": {
            "everySteps": eval_every_steps(spec),
            "domain": _sources(spec.eval.domain),
            "general": _sources(spec.eval.general),
            "unseenGeneral": _sources(spec.eval.unseen_general),
            "holdOutPerMille": spec.eval.hold_out_per_mille,
            "maxTokens": spec.eval.max_tokens,
            "klTopK": spec.eval.kl_top_k,
        },
        "training": {
            "learningRate": parse_decimal(resolved.learning_rate),
            "minLearningRate": parse_decimal(resolved.min_learning_rate),
            "schedule": training.schedule,
            "warmupSteps": resolved.warmup_steps,
            "decayPercent": training.decay_percent,
            "microBatchSize": resolved.micro_batch_size,
            "gradientAccumulationSteps": resolved.gradient_accumulation_steps,
            "globalBatchTokens": resolved.global_batch_tokens,
            "maxSteps": training.max_steps,
            "precision": training.precision,
            "zeroStage": zero_stage(spec),
            "seed": training.seed,
            "gradientClipping": parse_decimal(training.gradient_clipping),
            "weightDecay": parse_decimal(training.weight_decay),
            "activationCheckpointing": training.activation_checkpointing,
            "compile": resolved_compile(spec),
            "lossChunkTokens": resolved_loss_chunk_tokens(spec),
        },
        "forgetting": _forgetting(spec),
        "checkpoints": {
            "everySteps": spec.checkpoints.every_steps,
            "output": spec.checkpoints.output,
            "keep": spec.checkpoints.keep,
            "keepResumable": spec.checkpoints.keep_resumable,
            "outputRetention": spec.checkpoints.output_retention,
            "localDir": CHECKPOINT_LOCAL_DIR,
            "candidates": {
                "averageLast": candidates.average_last,
                "interpolationAlphas": [percent / 100 for percent in candidates.interpolation_alpha_percents],
            },
        },
        "report": {
            "forgeJob": {
                "group": GROUP,
                "version": VERSION,
                "plural": PLURAL,
                "namespace": owner.namespace,
                "name": owner.name,
            },
            "minIntervalSeconds": float(options.report_min_interval_seconds),
            "metricsPort": options.trainer_metrics_port,
        },
        "watchdog": {
            "multiple": float(spec.monitoring.hang_multiple),
            "floorSeconds": float(spec.monitoring.hang_floor_seconds),
        },
        "pace": {
            "stragglerPercent": spec.monitoring.straggler_percent,
            "dropPercent": spec.monitoring.throughput_drop_percent,
            "readBacks": spec.monitoring.slow_read_backs,
        },
    }
    probe = _probe(spec)
    if probe is not None:
        config["training"]["probe"] = probe
    return config


# --- children --------------------------------------------------------------------------------------------------


def build_config_map(owner: Owner, spec: ForgeJobSpec, resolved: Resolved, options: RenderOptions) -> dict[str, Any]:
    """``<job>-config``: the trainer config, plus (in its data, not an annotation: it holds literal env values) the
    accepted spec that later spec changes are checked against."""
    config = build_trainer_config(owner, spec, resolved, options)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_map_name(owner.name), {SPEC_DIGEST_ANNOTATION: spec_digest(spec)}),
        "data": {
            CONFIG_KEY: json.dumps(config, indent=2, sort_keys=True) + "\n",
            ACCEPTED_SPEC_KEY: canonical_json(frozen_spec(spec)) + "\n",
        },
    }


def build_service_account(owner: Owner, spec: ForgeJobSpec | None = None) -> dict[str, Any]:
    account: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(owner, trainer_account_name(owner.name)),
    }
    if spec is not None and spec.resources.image_pull_secrets:
        account["imagePullSecrets"] = [{"name": name} for name in spec.resources.image_pull_secrets]
    return account


def build_role(owner: Owner) -> dict[str, Any]:
    """Read this ForgeJob, and read and patch its status: nothing else, no other ForgeJob."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(owner, trainer_account_name(owner.name)),
        "rules": [
            {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [owner.name], "verbs": ["get"]},
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [owner.name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def build_role_binding(owner: Owner) -> dict[str, Any]:
    name = trainer_account_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(owner, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def _container_resources(spec: ForgeJobSpec, options: RenderOptions) -> dict[str, Any]:
    """The ForgeJob's requests and limits, or the operator's defaults when it sets neither; GPUs from gpusPerNode."""
    own = spec.resources.resources
    if own.limits or own.requests:
        limits: dict[str, int | str] = dict(own.limits)
        requests: dict[str, int | str] = dict(own.requests)
    else:
        limits = dict(options.trainer_resources.get("limits", {}))
        requests = dict(options.trainer_resources.get("requests", {}))
    if spec.resources.gpus_per_node > 0:
        limits[spec.resources.gpu_resource] = spec.resources.gpus_per_node
        requests[spec.resources.gpu_resource] = spec.resources.gpus_per_node
    resources: dict[str, Any] = {}
    if limits:
        resources["limits"] = limits
    if requests:
        resources["requests"] = requests
    return resources


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _env(spec: ForgeJobSpec) -> list[dict[str, Any]]:
    """The trainer's variables: its pod and node from the downward API (a straggler is named with them), then the
    ForgeJob's own."""
    return [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        _field_env("FORGE_POD_NAME", "metadata.name"),
        _field_env("FORGE_NODE_NAME", "spec.nodeName"),
        *(var.to_api() for var in spec.env),
    ]


def processes_per_pod(spec: ForgeJobSpec) -> int:
    """Trainer processes in each pod (local ranks): one per GPU, or one on CPU."""
    return max(spec.resources.gpus_per_node, 1)


def metrics_ports(spec: ForgeJobSpec, options: RenderOptions) -> list[dict[str, Any]]:
    """Local rank 0 serves /metrics on port 'metrics'; rank i on metricsPort + i, port 'metrics-<i>'."""
    base = options.trainer_metrics_port
    return [
        {"name": "metrics" if rank == 0 else f"metrics-{rank}", "containerPort": base + rank, "protocol": "TCP"}
        for rank in range(processes_per_pod(spec))
    ]


def _empty_dir(medium: str | None, size_limit: int | str | None) -> dict[str, Any]:
    empty_dir: dict[str, Any] = {}
    if medium:
        empty_dir["medium"] = medium
    if size_limit is not None:
        empty_dir["sizeLimit"] = size_limit
    return empty_dir


def _pod_api(model: ApiModel) -> dict[str, Any]:
    """A pod-template block in its Kubernetes form: unset and default-valued fields left out (empty lists, false)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)


def _pod_template(owner: Owner, spec: ForgeJobSpec, options: RenderOptions, image: str) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": "forge-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "forge-config", "configMap": {"name": config_map_name(owner.name)}},
        {"name": "scratch", "emptyDir": _empty_dir(None, spec.resources.scratch_size_limit)},
    ]
    if options.restricted:
        # The root filesystem is read-only: torchrun, Python and the compilers write temporary files under /tmp.
        mounts.append({"name": "tmp", "mountPath": TMP_DIR})
        volumes.append({"name": "tmp", "emptyDir": {}})
    if spec.resources.gpus_per_node > 0:
        # NCCL and data loaders need more shared memory than a container's default 64 MiB.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": _empty_dir("Memory", spec.resources.shm_size_limit)})
    # The ForgeJob's own volumes (a dataset or cache PVC, ...), after Forge's (validation keeps names and paths apart).
    volumes += [_pod_api(volume) for volume in spec.resources.volumes]
    mounts += [_pod_api(mount) for mount in spec.resources.volume_mounts]
    container: dict[str, Any] = {
        "name": PYTORCH_CONTAINER,
        "image": image,
        "command": [TRAINER_COMMAND, "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "ports": [
            {"name": PYTORCH_PORT_NAME, "containerPort": PYTORCH_PORT, "protocol": "TCP"},
            *metrics_ports(spec, options),
        ],
        "env": _env(spec),
        **({"envFrom": [_pod_api(source) for source in spec.env_from]} if spec.env_from else {}),
        "resources": _container_resources(spec, options),
        "volumeMounts": mounts,
    }
    pull_policy = spec.resources.image_pull_policy or options.trainer_image_pull_policy
    if pull_policy is not None:
        container["imagePullPolicy"] = pull_policy
    pod_spec: dict[str, Any] = {
        "serviceAccountName": trainer_account_name(owner.name),
        "containers": [container],
        "volumes": volumes,
    }
    if options.restricted:
        pod_spec["securityContext"] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        container["securityContext"] = {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.to_api() for t in spec.resources.tolerations]
    if spec.resources.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.resources.image_pull_secrets]
    if spec.scheduling.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduling.scheduler_name
    if spec.resources.affinity is not None:
        pod_spec["affinity"] = _pod_api(spec.resources.affinity)
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name
    # The ForgeJob's allowed labels and annotations; Forge's labels last (validation refuses its keys anyway).
    metadata: dict[str, Any] = {"labels": {**spec.resources.pod_labels, **labels(owner.name)}}
    if spec.resources.pod_annotations:
        metadata["annotations"] = dict(spec.resources.pod_annotations)
    return {"metadata": metadata, "spec": pod_spec}


def suspend_value(suspend: bool) -> str:
    """The SUSPEND_ANNOTATION value for a spec.suspend."""
    return "true" if suspend else "false"


def created_suspended(spec: ForgeJobSpec) -> bool:
    """A queued run is created suspended, as Kueue's webhook would make it: no pod starts before admission."""
    return spec.suspend or spec.scheduling.queue_name is not None


def build_run_policy(spec: ForgeJobSpec) -> dict[str, Any]:
    run_policy: dict[str, Any] = {"backoffLimit": spec.run_policy.backoff_limit, "suspend": created_suspended(spec)}
    if spec.run_policy.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = spec.run_policy.ttl_seconds_after_finished
    if spec.run_policy.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    scheduling_policy = build_scheduling_policy(spec)
    if scheduling_policy is not None:
        run_policy["schedulingPolicy"] = scheduling_policy
    return run_policy


def build_scheduling_policy(spec: ForgeJobSpec) -> dict[str, Any] | None:
    """Kubeflow's runPolicy.schedulingPolicy for a gang: minAvailable defaults to every pod of the run."""
    gang = spec.scheduling.gang
    if gang is None:
        return None
    policy: dict[str, Any] = {"minAvailable": gang.min_available or spec.resources.nodes}
    if gang.queue:
        policy["queue"] = gang.queue
    priority_class = gang.priority_class or spec.scheduling.priority_class_name
    if priority_class:
        policy["priorityClass"] = priority_class
    if gang.schedule_timeout_seconds is not None:
        policy["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    return policy


def queue_labels(spec: ForgeJobSpec) -> dict[str, str]:
    """Kueue's labels on the PyTorchJob: the LocalQueue and the WorkloadPriorityClass."""
    scheduling = spec.scheduling
    result: dict[str, str] = {}
    if scheduling.queue_name:
        result[QUEUE_LABEL] = scheduling.queue_name
    if scheduling.workload_priority_class:
        result[PRIORITY_CLASS_LABEL] = scheduling.workload_priority_class
    return result


def build_pytorchjob(owner: Owner, spec: ForgeJobSpec, options: RenderOptions) -> dict[str, Any]:
    """The Kubeflow PyTorchJob: Master 1 + Worker nodes-1, one ``pytorch`` container per pod."""
    image = spec.resources.image or options.trainer_image
    if not image:
        raise ValueError("no trainer image: set spec.resources.image or FORGE_TRAINER_IMAGE")
    template = _pod_template(owner, spec, options, image)

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": spec.run_policy.restart_policy, "template": template}

    replicas = {"Master": replica(1)}
    if spec.resources.nodes > 1:
        replicas["Worker"] = replica(spec.resources.nodes - 1)
    annotations = {SPEC_DIGEST_ANNOTATION: spec_digest(spec), SUSPEND_ANNOTATION: suspend_value(spec.suspend)}
    metadata = _metadata(owner, pytorchjob_name(owner.name), annotations)
    metadata["labels"].update(queue_labels(spec))
    metadata["finalizers"] = [FINAL_STATUS_FINALIZER]
    return {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": PYTORCHJOB_KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(processes_per_pod(spec)),
            "runPolicy": build_run_policy(spec),
            "pytorchReplicaSpecs": replicas,
        },
    }


def trainjob_name(job: str) -> str:
    return job


def trainjob_command() -> list[str]:
    """forge-trainer itself: it reads the runtime's PET_* variables (as torchrun would) and starts one process per
    local rank, so the pod's exit code is the trainer's (an early stop 10, a retryable outage 200-202), not
    torchrun's 1 for any failure."""
    return [TRAINER_COMMAND, "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]


# Pod spec fields a v2.3.0 runtime patch may carry (the rest of Forge's pod template: see build_trainjob).
_PATCHABLE_POD_FIELDS = (
    "serviceAccountName",
    "volumes",
    "securityContext",
    "nodeSelector",
    "tolerations",
    "affinity",
    "imagePullSecrets",
)


def build_trainjob(owner: Owner, spec: ForgeJobSpec, options: RenderOptions) -> dict[str, Any]:
    """The Kubeflow Trainer v2 TrainJob: ``nodes`` nodes of the referenced torch runtime, one trainer container each.

    The pod template is the PyTorchJob's (one source): image, env and resources go to ``spec.trainer``; labels,
    annotations, the ServiceAccount, volumes and mounts, security contexts, node selection and pull secrets go to a
    runtime patch owned by Forge. What a v2.3.0 TrainJob cannot carry (container ports, imagePullPolicy, envFrom,
    priorityClassName, schedulerName, a gang, a restart policy and TTL) is refused by validation when set.
    """
    image = spec.resources.image or options.trainer_image
    if not image:
        raise ValueError("no trainer image: set spec.resources.image or FORGE_TRAINER_IMAGE")
    template = _pod_template(owner, spec, options, image)
    pod_spec = template["spec"]
    container = pod_spec["containers"][0]
    container_patch: dict[str, Any] = {"name": TRAINJOB_NODE, "volumeMounts": container["volumeMounts"]}
    if "securityContext" in container:
        container_patch["securityContext"] = container["securityContext"]
    pod_patch: dict[str, Any] = {key: pod_spec[key] for key in _PATCHABLE_POD_FIELDS if key in pod_spec}
    pod_patch["containers"] = [container_patch]
    replicated_job = {
        "name": TRAINJOB_NODE,
        "template": {"spec": {"template": {"metadata": template["metadata"], "spec": pod_patch}}},
    }
    trainer: dict[str, Any] = {
        "image": image,
        "command": trainjob_command(),
        "env": container["env"],
        "numNodes": spec.resources.nodes,
        "numProcPerNode": processes_per_pod(spec),
    }
    if container["resources"]:
        trainer["resourcesPerNode"] = container["resources"]
    annotations = {SPEC_DIGEST_ANNOTATION: spec_digest(spec), SUSPEND_ANNOTATION: suspend_value(spec.suspend)}
    metadata = _metadata(owner, trainjob_name(owner.name), annotations)
    metadata["labels"].update(queue_labels(spec))
    metadata["finalizers"] = [FINAL_STATUS_FINALIZER]
    job_spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": TRAINER_GROUP,
            "kind": "ClusterTrainingRuntime",
            "name": spec.training_runtime or options.training_runtime,
        },
        "suspend": created_suspended(spec),
        "trainer": trainer,
        "runtimePatches": [
            {
                "manager": RUNTIME_PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated_job]}}},
            }
        ],
    }
    if spec.run_policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {"apiVersion": TRAINJOB_API_VERSION, "kind": TRAINJOB_KIND, "metadata": metadata, "spec": job_spec}


def build_support(owner: Owner, spec: ForgeJobSpec, resolved: Resolved, options: RenderOptions) -> list[dict[str, Any]]:
    """What the trainer pods need before the child job exists: config, ServiceAccount, Role, RoleBinding."""
    return [
        build_config_map(owner, spec, resolved, options),
        build_service_account(owner, spec),
        build_role(owner),
        build_role_binding(owner),
    ]


def build_children(
    owner: Owner, spec: ForgeJobSpec, resolved: Resolved, options: RenderOptions
) -> list[dict[str, Any]]:
    """Every child of a PyTorchJob run in creation order: the PyTorchJob last, once what its pods need exists."""
    return [*build_support(owner, spec, resolved, options), build_pytorchjob(owner, spec, options)]
