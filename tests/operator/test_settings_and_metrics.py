"""FORGE_* settings and the operator's metrics."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from forge_operator import metrics
from forge_operator.handlers.common import guard
from forge_operator.settings import Settings


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_NAMESPACES", "team-a, team-b,")
    monkeypatch.setenv("FORGE_TRAINER_IMAGE", "repo/trainer:1")
    monkeypatch.setenv("FORGE_METRICS_PORT", "0")
    monkeypatch.setenv("FORGE_LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.trainer_image == "repo/trainer:1"
    assert settings.metrics_port == 0 and settings.log_level == "DEBUG"
    assert settings.render_options().trainer_image == "repo/trainer:1"


def test_defaults_watch_every_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORGE_NAMESPACES", "FORGE_TRAINER_IMAGE", "FORGE_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.namespaces == [] and settings.trainer_image is None and settings.metrics_port == 9300


def test_bad_settings_fail_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_METRICS_PORT", "70000")
    with pytest.raises(ValidationError, match="metrics_port"):
        Settings()


def test_forgejobs_by_state_counts_each_job_once() -> None:
    metrics.record_state("ns", "a", "Running")
    metrics.record_state("ns", "b", "Running")
    metrics.record_state("ns", "a", "Succeeded")
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'forge_forgejobs{state="Running"} 1.0' in text
    assert 'forge_forgejobs{state="Succeeded"} 1.0' in text
    assert 'forge_forgejobs{state="Failed"} 0.0' in text
    metrics.forget("ns", "a")
    metrics.forget("ns", "b")
    assert 'forge_forgejobs{state="Running"} 0.0' in generate_latest(metrics.REGISTRY).decode()


def test_errors_are_counted_by_kind() -> None:
    class ConflictError(Exception):
        status = 409

    before = metrics.ERRORS.labels(kind="conflict")._value.get()
    with pytest.raises(ConflictError), guard("unit", {"kind": "PyTorchJob"}):
        raise ConflictError()
    assert metrics.ERRORS.labels(kind="conflict")._value.get() == before + 1
    assert metrics.error_kind(RuntimeError()) == "internal"
    assert metrics.error_kind(type("E", (Exception,), {"status": 500})()) == "api"


def test_reconcile_latency_is_observed() -> None:
    with metrics.timed("latency-unit"):
        pass
    assert (
        'forge_reconcile_duration_seconds_count{handler="latency-unit"} 1.0'
        in generate_latest(metrics.REGISTRY).decode()
    )
