"""Operator configuration from the environment: every setting is ``FORGE_<NAME>`` (e.g. FORGE_TRAINER_IMAGE)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from forge_operator.render import RenderOptions


class Settings(BaseSettings):
    """Typed operator settings; see docs/operator.md for the full list."""

    model_config = SettingsConfigDict(env_prefix="FORGE_", extra="ignore", frozen=True)

    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Namespaces to watch, comma-separated (FORGE_NAMESPACES=team-a,team-b); empty: every namespace."""

    trainer_image: str | None = None
    """Trainer image used when a ForgeJob does not set spec.resources.image."""

    trainer_metrics_port: int = Field(default=9400, ge=1, le=65535)
    """Port of the trainer's Prometheus endpoint (a named container port 'metrics')."""

    report_min_interval_seconds: int = Field(default=5, ge=0, le=3600)
    """Minimum seconds between two status reports of the trainer."""

    metrics_port: int = Field(default=9300, ge=0, le=65535)
    """Port of the operator's own /metrics endpoint; 0 disables it."""

    health_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the liveness endpoint /healthz; 0 disables it."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the operator."""

    workers: int = Field(default=16, ge=1, le=256)
    """Threads running handlers (each handler makes blocking API calls)."""

    status_conflict_retries: int = Field(default=8, ge=1, le=100)
    """How often a status write is recomputed after a 409 Conflict before the handler is retried."""

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def render_options(self) -> RenderOptions:
        return RenderOptions(
            trainer_image=self.trainer_image,
            trainer_metrics_port=self.trainer_metrics_port,
            report_min_interval_seconds=self.report_min_interval_seconds,
        )
