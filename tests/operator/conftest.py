"""Fixtures of the operator's tests: the operator as a real subprocess (one per test module) and admin access."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LocalCluster
from tests.operator.helpers import Kube, OperatorProcess

# Operator-wide defaults for trainer pods, as the chart sets them (trainer.resources, trainer.image.pullPolicy).
OPERATOR_DEFAULTS = {
    "FORGE_TRAINER_RESOURCES": '{"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}',
    "FORGE_TRAINER_IMAGE_PULL_POLICY": "IfNotPresent",
}


@pytest.fixture(scope="module")
def operator_process(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """``forge-operator`` watching every namespace of the test cluster; stopped after the module."""
    log_path: Path = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(cluster.kubeconfig, log_path, extra_env=OPERATOR_DEFAULTS)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def kube(cluster: LocalCluster) -> Iterator[Kube]:
    with cluster.api_client() as api:
        yield Kube(api)
