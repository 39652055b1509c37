"""FORGE_* settings and the operator's metrics."""

from __future__ import annotations

import os
import re

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from forge_operator import metrics
from forge_operator.api import ForgeJobStatus
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
    assert settings.resync_seconds == 60


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


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FORGE_"):
            monkeypatch.delenv(name)


def test_trainer_resources_and_pull_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean(monkeypatch)
    monkeypatch.setenv(
        "FORGE_TRAINER_RESOURCES", '{"requests":{"cpu":"8","memory":"64Gi"},"limits":{"memory":"128Gi"}}'
    )
    monkeypatch.setenv("FORGE_TRAINER_IMAGE_PULL_POLICY", "IfNotPresent")
    options = Settings().render_options()
    assert options.trainer_resources == {"limits": {"memory": "128Gi"}, "requests": {"cpu": "8", "memory": "64Gi"}}
    assert options.trainer_image_pull_policy == "IfNotPresent"


@pytest.mark.parametrize("empty", ["", "{}", "null", '{"limits": {}, "requests": {}}'])
def test_empty_trainer_resources_mean_no_default(monkeypatch: pytest.MonkeyPatch, empty: str) -> None:
    _clean(monkeypatch)
    monkeypatch.setenv("FORGE_TRAINER_RESOURCES", empty)
    monkeypatch.setenv("FORGE_TRAINER_IMAGE_PULL_POLICY", "")
    settings = Settings()
    assert settings.trainer_resources is None and settings.trainer_image_pull_policy is None
    assert settings.render_options().trainer_resources == {}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FORGE_TRAINER_RESOURCES", '{"requests": {"cpu": "lots"}}', "not a Kubernetes quantity"),
        ("FORGE_TRAINER_RESOURCES", '{"requests": {"nvidia.com/gpu": 1}}', "gpusPerNode"),
        ("FORGE_TRAINER_RESOURCES", '{"request": {"cpu": "1"}}', "trainer_resources.request"),
        ("FORGE_TRAINER_RESOURCES", "cpu=8", "not JSON"),
        ("FORGE_TRAINER_IMAGE_PULL_POLICY", "Sometimes", "trainer_image_pull_policy"),
        ("FORGE_TRAINER_METRICS_PORT", "23450", "PyTorchJob port 23456"),
        ("FORGE_TRAINER_METRICS_PORT", "65530", "trainer_metrics_port"),
        ("FORGE_TRAINER_RESOURCES", '{"requests": {"memory": "-8Gi"}}', "-8Gi is negative"),
        (
            "FORGE_TRAINER_RESOURCES",
            '{"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}',
            'trainer_resources.requests["cpu"]: 4 is above its limit 2',
        ),
        ("FORGE_TRAINER_IMAGE", "repo/trainer :1", "whitespace"),
        ("FORGE_RESYNC_SECONDS", "0", "resync_seconds"),
    ],
)
def test_bad_trainer_settings_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    _clean(monkeypatch)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings()


def _samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.REGISTRY.collect()
        for s in family.samples
        if s.name == name
    }


def test_selected_step_and_checkpoints_per_forgejob() -> None:
    status = ForgeJobStatus.model_validate(
        {
            "state": "Running",
            "checkpoints": [
                {"step": 100, "uri": "s3://o/100/", "complete": True},
                {"step": 200, "uri": "s3://o/200/"},
                {"step": 300, "uri": "s3://o/300/", "complete": False},
                {"step": 200, "uri": "s3://o/200-wise-0.5/", "kind": "interpolation", "alpha": 0.5},
            ],
            "selected": {"step": 200, "uri": "s3://o/200/", "policy": "last", "reason": "r"},
        }
    )
    metrics.record_status("team", "gauged", status)
    labels = (("forge_job", "gauged"), ("namespace", "team"))
    assert _samples("forge_forgejob_selected_step")[labels] == 200
    assert _samples("forge_forgejob_checkpoints")[labels] == 2
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'forge_forgejob_selected_step{forge_job="gauged",namespace="team"} 200.0' in text
    assert not re.search(r'[{,]job="', text), "a label named job would be renamed on scrape"
    metrics.record_status("team", "gauged", status.model_copy(update={"selected": None}))
    assert labels not in _samples("forge_forgejob_selected_step"), "no selection: no series"
    metrics.forget("team", "gauged")
    assert labels not in _samples("forge_forgejob_checkpoints")
    metrics.forget("team", "gauged")  # twice: nothing to remove, no error


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/apis/kubeflow.org/v1/namespaces/a/pytorchjobs/x", ("kubeflow.org", "pytorchjobs")),
        ("/api/v1/namespaces/a/configmaps", ("", "configmaps")),
        ("/apis/forge.dev/v1alpha1/namespaces/a/forgejobs/x/status", ("forge.dev", "forgejobs/status")),
        ("/apis/kubeflow.org/v1", ("kubeflow.org", "")),
        (
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            ("authorization.k8s.io", "selfsubjectaccessreviews"),
        ),
    ],
)
def test_requests_are_counted_by_the_rbac_resource_they_need(path: str, expected: tuple[str, str]) -> None:
    from forge_operator.permissions import api_resource

    assert api_resource(path) == expected


def test_pod_metadata_allow_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_POD_METADATA_ALLOWED_KEYS", raising=False)
    assert "*" in Settings().pod_metadata_allowed_keys
    monkeypatch.setenv("FORGE_POD_METADATA_ALLOWED_KEYS", "example.com/*, team,")
    assert Settings().pod_metadata_allowed_keys == ["example.com/*", "team"]
    monkeypatch.setenv("FORGE_POD_METADATA_ALLOWED_KEYS", "")
    assert Settings().pod_metadata_allowed_keys == []
    monkeypatch.setenv("FORGE_POD_METADATA_ALLOWED_KEYS", "example.com/te*m")
    with pytest.raises(ValueError, match="pod_metadata_allowed_keys"):
        Settings()
