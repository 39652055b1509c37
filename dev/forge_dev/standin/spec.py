"""Typed view of the parts of a Kubeflow PyTorchJob (kubeflow.org/v1) and its pod templates the stand-in uses.

Parsing is lenient (unknown fields are ignored), so any PyTorchJob the real CRD accepts parses here. The pure
helpers at the bottom turn a job into its replicas (pod names, node ranks, local ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"

MASTER = "Master"
WORKER = "Worker"
REPLICA_TYPES = (MASTER, WORKER)
DEFAULT_CONTAINER_NAME = "pytorch"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class KeySelector(_Model):
    """configMapKeyRef / secretKeyRef."""

    name: str = ""
    key: str
    optional: bool = False


class FieldSelector(_Model):
    field_path: str


class EnvVarSource(_Model):
    config_map_key_ref: KeySelector | None = None
    secret_key_ref: KeySelector | None = None
    field_ref: FieldSelector | None = None
    resource_field_ref: dict[str, Any] | None = None


class EnvVar(_Model):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


class NameRef(_Model):
    """configMapRef / secretRef of an envFrom entry."""

    name: str = ""
    optional: bool = False


class EnvFromSource(_Model):
    prefix: str = ""
    config_map_ref: NameRef | None = None
    secret_ref: NameRef | None = None


class VolumeMount(_Model):
    name: str
    mount_path: str
    sub_path: str = ""
    read_only: bool = False


class ContainerPort(_Model):
    container_port: int
    name: str = ""


class Container(_Model):
    name: str
    ports: list[ContainerPort] = Field(default_factory=list)
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    env_from: list[EnvFromSource] = Field(default_factory=list)
    volume_mounts: list[VolumeMount] = Field(default_factory=list)
    working_dir: str | None = None
    image: str | None = None


class KeyToPath(_Model):
    key: str
    path: str
    mode: int | None = None


class ConfigMapVolumeSource(_Model):
    name: str = ""
    items: list[KeyToPath] = Field(default_factory=list)
    optional: bool = False
    default_mode: int | None = None


class SecretVolumeSource(_Model):
    secret_name: str = ""
    items: list[KeyToPath] = Field(default_factory=list)
    optional: bool = False
    default_mode: int | None = None


class ProjectionSource(_Model):
    """configMap / secret entry of a projected volume (both carry ``name``)."""

    name: str = ""
    items: list[KeyToPath] = Field(default_factory=list)
    optional: bool = False


class VolumeProjection(_Model):
    config_map: ProjectionSource | None = None
    secret: ProjectionSource | None = None


class ProjectedVolumeSource(_Model):
    sources: list[VolumeProjection] = Field(default_factory=list)
    default_mode: int | None = None


class HostPathVolumeSource(_Model):
    path: str


class ClaimVolumeSource(_Model):
    claim_name: str


class Volume(_Model):
    name: str
    config_map: ConfigMapVolumeSource | None = None
    secret: SecretVolumeSource | None = None
    projected: ProjectedVolumeSource | None = None
    empty_dir: dict[str, Any] | None = None
    host_path: HostPathVolumeSource | None = None
    persistent_volume_claim: ClaimVolumeSource | None = None


class PodSpec(_Model):
    containers: list[Container] = Field(default_factory=list)
    volumes: list[Volume] = Field(default_factory=list)
    service_account_name: str | None = None
    service_account: str | None = None  # deprecated alias of serviceAccountName, still honoured by Kubernetes
    termination_grace_period_seconds: int | None = None


class TemplateMeta(_Model):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodTemplate(_Model):
    metadata: TemplateMeta = Field(default_factory=TemplateMeta)
    spec: PodSpec = Field(default_factory=PodSpec)


class ReplicaSpec(_Model):
    replicas: int = 1
    restart_policy: str = "Never"
    template: PodTemplate = Field(default_factory=PodTemplate)


class RunPolicy(_Model):
    backoff_limit: int | None = None
    suspend: bool = False
    active_deadline_seconds: int | None = None


class PyTorchJobSpec(_Model):
    pytorch_replica_specs: dict[str, ReplicaSpec]
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    nproc_per_node: str | None = None


class ObjectMeta(_Model):
    name: str
    namespace: str
    uid: str = ""
    resource_version: str = ""
    deletion_timestamp: str | None = None


class PyTorchJob(_Model):
    metadata: ObjectMeta
    spec: PyTorchJobSpec
    status: dict[str, Any] = Field(default_factory=dict)


class JobSpecError(ValueError):
    """The PyTorchJob cannot be run by the stand-in (the message says why)."""


def parse_job(obj: dict[str, Any]) -> PyTorchJob:
    """Parse a PyTorchJob as returned by the API. Raises JobSpecError when it cannot be run."""
    try:
        job = PyTorchJob.model_validate(obj)
    except ValueError as error:
        raise JobSpecError(f"cannot parse PyTorchJob: {error}") from error
    unknown = sorted(set(job.spec.pytorch_replica_specs) - set(REPLICA_TYPES))
    if unknown:
        raise JobSpecError(f"unknown replica types {unknown}: a PyTorchJob has only Master and Worker")
    if not job.spec.pytorch_replica_specs:
        raise JobSpecError("spec.pytorchReplicaSpecs is empty")
    for rtype, spec in job.spec.pytorch_replica_specs.items():
        if spec.replicas < 0:
            raise JobSpecError(f"{rtype}: replicas must not be negative")
        pytorch_container(spec, rtype)
    return job


def pytorch_container(spec: ReplicaSpec, rtype: str) -> Container:
    """The template's ``pytorch`` container (the one Kubeflow injects its environment into)."""
    for container in spec.template.spec.containers:
        if container.name == DEFAULT_CONTAINER_NAME:
            return container
    raise JobSpecError(f"{rtype}: the pod template has no container named {DEFAULT_CONTAINER_NAME!r}")


def service_account_name(spec: ReplicaSpec) -> str:
    pod = spec.template.spec
    return pod.service_account_name or pod.service_account or "default"


def nproc_per_node(spec: PyTorchJobSpec) -> int:
    """Local processes per replica: nprocPerNode when it is an integer > 1, else 1 (auto/cpu/gpu/unset)."""
    value = (spec.nproc_per_node or "").strip()
    if value.isdigit() and int(value) > 1:
        return int(value)
    return 1


@dataclass(frozen=True)
class ReplicaId:
    """One replica (one pod in Kubernetes): ``Master`` 0, ``Worker`` 0..n-1."""

    rtype: str
    index: int
    node_rank: int

    @property
    def name(self) -> str:
        """``master-0``, ``worker-1``: the pod name without the job prefix; also the log file's stem."""
        return f"{self.rtype.lower()}-{self.index}"

    def pod_name(self, job_name: str) -> str:
        return f"{job_name}-{self.name}"


def replica_ids(spec: PyTorchJobSpec) -> list[ReplicaId]:
    """Every replica in node-rank order: the Master is node rank 0, workers follow (Kubeflow's RANK rule).

    Without a Master, worker 0 is node rank 0.
    """
    replicas: list[ReplicaId] = []
    node_rank = 0
    for rtype in REPLICA_TYPES:
        rspec = spec.pytorch_replica_specs.get(rtype)
        if rspec is None:
            continue
        for index in range(rspec.replicas):
            replicas.append(ReplicaId(rtype, index, node_rank))
            node_rank += 1
    return replicas


def world_size(spec: PyTorchJobSpec) -> int:
    return len(replica_ids(spec)) * nproc_per_node(spec)


def replica_selector(job_name: str, rtype: str) -> str:
    """The label selector Kubeflow writes into status.replicaStatuses[rtype].selector."""
    return (
        f"training.kubeflow.org/job-name={job_name},training.kubeflow.org/operator-name=pytorchjob-controller,"
        f"training.kubeflow.org/replica-type={rtype.lower()}"
    )


def pod_labels(job_name: str, replica: ReplicaId, template_labels: dict[str, str]) -> dict[str, str]:
    """The labels Kubeflow puts on a replica's pod: the template's plus its own (used by fieldRef)."""
    labels = dict(template_labels)
    labels.update(
        {
            "training.kubeflow.org/job-name": job_name,
            "training.kubeflow.org/operator-name": "pytorchjob-controller",
            "training.kubeflow.org/replica-type": replica.rtype.lower(),
            "training.kubeflow.org/replica-index": str(replica.index),
        }
    )
    if replica.rtype == MASTER and replica.index == 0:
        labels["training.kubeflow.org/job-role"] = "master"
    return labels
