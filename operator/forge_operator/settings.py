"""Operator configuration from the environment: every setting is ``FORGE_<NAME>`` (e.g. FORGE_TRAINER_IMAGE)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from forge_operator.api import BACKENDS, DNS_SUBDOMAIN_PATTERN, LABEL_KEY_PATTERN, QUANTITY_PATTERN, BackendName
from forge_operator.render import DEFAULT_TRAINING_RUNTIME, GPU_RESOURCE, PYTORCH_PORT, RenderOptions
from forge_operator.validation import (
    DEFAULT_POD_METADATA_ALLOWED_KEYS,
    check_image,
    check_quantities,
    format_errors,
)

# Local ranks per pod are at most 16 (spec.resources.gpusPerNode <= 16): ports metricsPort .. metricsPort + 15.
MAX_LOCAL_RANKS = 16
_QUANTITY = re.compile(QUANTITY_PATTERN)


class TrainerResources(BaseModel):
    """Default requests and limits of the trainer container (the Kubernetes ResourceRequirements shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limits: dict[str, int | str] = Field(default_factory=dict)
    requests: dict[str, int | str] = Field(default_factory=dict)

    @field_validator("limits", "requests")
    @classmethod
    def _quantities(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        for name, quantity in value.items():
            if name == GPU_RESOURCE:
                raise ValueError(f"{name}: GPUs come from each ForgeJob's spec.resources.gpusPerNode")
            if isinstance(quantity, bool) or not _QUANTITY.match(str(quantity)):
                raise ValueError(f"{name}: {quantity!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
        return value

    @model_validator(mode="after")
    def _sane(self) -> TrainerResources:
        errors = check_quantities("trainer_resources", self.limits, self.requests)
        if errors:
            raise ValueError(format_errors(errors))
        return self

    def to_api(self) -> dict[str, dict[str, int | str]]:
        return {key: dict(value) for key, value in (("limits", self.limits), ("requests", self.requests)) if value}


class Settings(BaseSettings):
    """Typed operator settings; see docs/operator.md for the full list."""

    model_config = SettingsConfigDict(env_prefix="FORGE_", extra="ignore", frozen=True)

    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Namespaces to watch, comma-separated (FORGE_NAMESPACES=team-a,team-b); empty: every namespace."""

    trainer_image: str | None = None
    """Trainer image used when a ForgeJob does not set spec.resources.image."""

    default_backend: BackendName = "pytorchjob"
    """The child job of ForgeJobs that set no spec.backend: pytorchjob (Kubeflow training-operator PyTorchJob) or
    trainjob (Kubeflow Trainer v2 TrainJob). Its API is checked at start-up."""

    backends: Annotated[list[BackendName], NoDecode] = Field(default_factory=lambda: list(BACKENDS))
    """Backends ForgeJobs may use, comma-separated (FORGE_BACKENDS=pytorchjob,trainjob); the operator watches only
    these kinds (and the chart grants RBAC only for these). Must include the default backend."""

    trainjob_runtime: str = Field(
        default=DEFAULT_TRAINING_RUNTIME, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN
    )
    """ClusterTrainingRuntime of TrainJobs whose ForgeJob sets no spec.trainingRuntime (a Kubeflow Trainer v2 torch
    runtime)."""

    trainer_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """imagePullPolicy of the trainer container when a ForgeJob does not set spec.resources.imagePullPolicy; unset
    or empty: the Kubernetes default."""

    trainer_resources: TrainerResources | None = None
    """Requests and limits (JSON, e.g. {"requests": {"cpu": "8", "memory": "64Gi"}}) of the trainer container when a
    ForgeJob sets neither spec.resources.resources.requests nor .limits; nvidia.com/gpu is refused (GPUs come from
    gpusPerNode)."""

    trainer_metrics_port: int = Field(default=9400, ge=1, le=65535 - (MAX_LOCAL_RANKS - 1))
    """Base port of the trainer's Prometheus endpoints: local rank i listens on this + i (container ports
    'metrics', 'metrics-1', ...)."""

    report_min_interval_seconds: int = Field(default=30, ge=0, le=3600)
    """Minimum seconds between two status reports of the trainer (progress and throughput; an evaluation, a
    checkpoint or a guard verdict is reported within a second)."""

    metrics_port: int = Field(default=9300, ge=0, le=65535)
    """Port of the operator's own /metrics endpoint; 0 disables it."""

    health_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the liveness endpoint /healthz; 0 disables it."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the operator."""

    workers: int = Field(default=16, ge=1, le=256)
    """Threads running handlers (each handler makes blocking API calls)."""

    trainer_pod_security: Literal["restricted", "none"] = "restricted"
    """restricted: trainer pods meet Pod Security "restricted" (runAsNonRoot, seccomp RuntimeDefault, no privilege
    escalation, capabilities dropped, read-only root filesystem with /tmp writable); the trainer image must run as a
    numeric non-root user (Forge's does, 10001). none: no securityContext (for images that need root)."""

    resync_seconds: int = Field(default=60, ge=1, le=86_400)
    """Seconds between two resyncs of each ForgeJob: the reconcile runs again without any event (children
    re-ensured, the PyTorchJob re-mirrored), so a failed status write or re-create is repaired."""

    liveness_check_seconds: int = Field(default=30, ge=1, le=3600)
    """Seconds between two stall checks of each running ForgeJob (a stall is seen at most this long after its
    limit; the check reads no object unless the run is stalled or a stall restart is unfinished)."""

    stall_floor_seconds: int = Field(default=600, ge=10, le=86_400)
    """The least stall limit derived from a run's pace when spec.monitoring.stallMinutes is omitted (default 10
    minutes). Lower it only for drills and tests (e.g. 20): a report gap of the trainer must never reach it."""

    retry_max_seconds: int = Field(default=300, ge=5, le=3600)
    """Ceiling of the exponential back-off (5 s, 10 s, 20 s, ...) after the cluster refuses a reconcile (missing
    CRD, missing RBAC, API server unavailable)."""

    status_conflict_retries: int = Field(default=8, ge=1, le=100)
    """How often a status write is recomputed after a 409 Conflict before the handler is retried."""

    pod_metadata_allowed_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_POD_METADATA_ALLOWED_KEYS)
    )
    """Label and annotation keys a ForgeJob may put on its trainer pods (spec.resources.podLabels, podAnnotations),
    comma-separated: "*" allows every key without a prefix, "example.com/*" every key under a prefix, anything else
    one exact key; empty allows none. Keys of Forge, Kubernetes' app.kubernetes.io, the training operator, Kueue and
    the gang schedulers are refused whatever this says."""

    @field_validator("namespaces", "pod_metadata_allowed_keys", "backends", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("pod_metadata_allowed_keys")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            key = pattern[:-2] + "/x" if pattern.endswith("/*") else "x" if pattern == "*" else pattern
            if "*" in key or not re.fullmatch(LABEL_KEY_PATTERN, key):
                raise ValueError(f"{pattern!r} is not a key, 'prefix/*' or '*'")
        return value

    @field_validator("trainer_image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        errors = check_image("trainer_image", value) if value else []
        if errors:
            raise ValueError(errors[0].message)
        return value

    @field_validator("trainer_image_pull_policy", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trainer_resources", mode="before")
    @classmethod
    def _json(cls, value: object) -> Any:
        """JSON text (the chart writes `trainer.resources | toJson`); empty, null and {} mean no default."""
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not JSON: {error.msg} at column {error.colno}") from None
        if value == {} or value == {"limits": {}, "requests": {}}:
            return None
        return value

    @model_validator(mode="after")
    def _default_backend_enabled(self) -> Settings:
        if self.default_backend not in self.backends:
            raise ValueError(
                f"default_backend: {self.default_backend} is not in backends ({','.join(self.backends) or 'none'})"
            )
        return self

    @model_validator(mode="after")
    def _metrics_ports_clear_of_rendezvous(self) -> Settings:
        last = self.trainer_metrics_port + MAX_LOCAL_RANKS - 1
        if self.trainer_metrics_port <= PYTORCH_PORT <= last:
            raise ValueError(
                f"trainer_metrics_port: ports {self.trainer_metrics_port}-{last} (one per local rank) would include "
                f"the PyTorchJob port {PYTORCH_PORT}"
            )
        return self

    def render_options(self) -> RenderOptions:
        return RenderOptions(
            trainer_image=self.trainer_image,
            trainer_metrics_port=self.trainer_metrics_port,
            report_min_interval_seconds=self.report_min_interval_seconds,
            trainer_resources=self.trainer_resources.to_api() if self.trainer_resources else {},
            trainer_image_pull_policy=self.trainer_image_pull_policy,
            restricted=self.trainer_pod_security == "restricted",
            training_runtime=self.trainjob_runtime,
        )
