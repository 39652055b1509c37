"""Shared fixtures: a real local control plane (one per test session) and a fresh namespace per test."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from forge_dev.controlplane import ControlPlane
from forge_dev.crds import install_crds, install_trainer_v2, minimal_pytorchjob_crd_path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
KUBEFLOW_PYTORCHJOB_CRD = SHARED_FIXTURES / "kubeflow.org_pytorchjobs.yaml"
KUBEFLOW_TRAINER_V2 = SHARED_FIXTURES / "kubeflow-trainer-v2.3.0"


def pytorchjob_crd_path() -> Path:
    """Kubeflow's real PyTorchJob CRD from ../shared/fixtures, or Forge's own permissive one when it is absent."""
    if KUBEFLOW_PYTORCHJOB_CRD.is_file():
        return KUBEFLOW_PYTORCHJOB_CRD
    warnings.warn(
        f"{KUBEFLOW_PYTORCHJOB_CRD} not found: using Forge's minimal PyTorchJob CRD, which does not validate "
        "PyTorchJob specs against Kubeflow's schema",
        stacklevel=1,
    )
    return minimal_pytorchjob_crd_path()


def uses_real_kubeflow_crd() -> bool:
    return KUBEFLOW_PYTORCHJOB_CRD.is_file()


def trainer_v2_fixtures() -> Path | None:
    """Kubeflow Trainer v2.3.0's CRDs and torch-distributed runtime from ../shared/fixtures, or None (then Forge's
    own permissive ones are installed)."""
    if (KUBEFLOW_TRAINER_V2 / "trainer.kubeflow.org_trainjobs.yaml").is_file():
        return KUBEFLOW_TRAINER_V2
    warnings.warn(
        f"{KUBEFLOW_TRAINER_V2} not found: using Forge's minimal TrainJob CRD, which does not validate TrainJob "
        "specs against Kubeflow Trainer's schema",
        stacklevel=1,
    )
    return None


@dataclass
class LocalCluster:
    """A running local control plane with Forge's CRDs and the PyTorchJob CRD installed."""

    control_plane: ControlPlane

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    @property
    def server(self) -> str:
        return self.control_plane.server

    def api_client(self) -> client.ApiClient:
        """A new admin API client (close it, or use it as a context manager)."""
        return config.new_client_from_config(config_file=str(self.kubeconfig))


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    control_plane = ControlPlane()
    control_plane.start()
    started = control_plane.pids()
    previous_kubeconfig = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(control_plane.kubeconfig)
    try:
        local = LocalCluster(control_plane)
        crd_files = [*sorted((REPO_ROOT / "crds").glob("*.yaml")), pytorchjob_crd_path()]
        with local.api_client() as api:
            install_crds(api, crd_files)
            install_trainer_v2(api, trainer_v2_fixtures())
        yield local
    finally:
        control_plane.stop()
        if previous_kubeconfig is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous_kubeconfig
        leftovers = [pid for pid in started.values() if Path(f"/proc/{pid}").exists() and _alive(pid)]
        if leftovers:
            pytest.fail(f"control-plane processes left running after stop: {leftovers}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (the namespace controller cleans its contents)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        try:
            yield name
        finally:
            core.delete_namespace(name)
