"""Install CustomResourceDefinitions into a cluster and wait until the API server serves them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

MINIMAL_PYTORCHJOB_CRD = "pytorchjob-crd-minimal.yaml"
MINIMAL_TRAINER_CRDS = "trainer-v2-crds-minimal.yaml"
MINIMAL_TORCH_RUNTIME = "torch-runtime-minimal.yaml"
# Kubeflow Trainer v2.3.0's files in the shared fixtures (../shared/fixtures/kubeflow-trainer-v2.3.0/).
TRAINER_CRD_FILES = (
    "trainer.kubeflow.org_trainjobs.yaml",
    "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "trainer.kubeflow.org_trainingruntimes.yaml",
)
TORCH_RUNTIME_FILE = "torch_distributed.yaml"


def minimal_pytorchjob_crd_path() -> Path:
    """Forge's own permissive PyTorchJob CRD, for machines without Kubeflow's real one."""
    return Path(str(resources.files("forge_dev") / "data" / MINIMAL_PYTORCHJOB_CRD))


def _data_path(name: str) -> Path:
    return Path(str(resources.files("forge_dev") / "data" / name))


def trainer_v2_files(folder: Path | None) -> tuple[list[Path], Path]:
    """Kubeflow Trainer v2's CRDs and torch-distributed runtime from ``folder`` (the shared fixtures), else Forge's
    own minimal ones (no validation: prefer Kubeflow's)."""
    if folder is not None and all((folder / name).is_file() for name in (*TRAINER_CRD_FILES, TORCH_RUNTIME_FILE)):
        return [folder / name for name in TRAINER_CRD_FILES], folder / TORCH_RUNTIME_FILE
    return [_data_path(MINIMAL_TRAINER_CRDS)], _data_path(MINIMAL_TORCH_RUNTIME)


def for_old_servers(schema: Any) -> Any:
    """A CRD schema a 1.20 API server accepts: every ``default: ""`` removed and its property made required.

    The 1.20 server reads an empty-string default as null and refuses it (Kubeflow Trainer's CRDs have dozens, e.g.
    ``imagePullSecrets[].name``); a list-map key then needs to be required instead. Other defaults stay.
    """
    if isinstance(schema, list):
        return [for_old_servers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    adapted = {key: for_old_servers(value) for key, value in schema.items()}
    properties = adapted.get("properties")
    if isinstance(properties, dict):
        emptied = sorted(
            name for name, sub in properties.items() if isinstance(sub, dict) and sub.get("default", None) == ""
        )
        for name in emptied:
            del properties[name]["default"]
        if emptied:
            adapted["required"] = [
                *adapted.get("required", []),
                *(n for n in emptied if n not in adapted.get("required", [])),
            ]
    return adapted


def load_crd_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition document in the given YAML files, in order."""
    documents: list[dict[str, Any]] = []
    for path in paths:
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            if document.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{path}: expected kind CustomResourceDefinition, got {document.get('kind')!r}")
            documents.append(for_old_servers(document))
    return documents


def install_crds(api_client: client.ApiClient, paths: Iterable[Path], timeout_s: float = 30.0) -> list[str]:
    """Create or replace the CRDs in ``paths`` and wait until each is Established. Returns their names.

    Created through the API (not kubectl) on purpose: a 1.20 server drops ``x-kubernetes-validations`` while
    a newer kubectl would reject the document client-side.
    """
    extensions = client.ApiextensionsV1Api(api_client)
    names: list[str] = []
    for document in load_crd_documents(paths):
        name = document["metadata"]["name"]
        try:
            existing = extensions.read_custom_resource_definition(name)
        except ApiException as error:
            if error.status != 404:
                raise
            extensions.create_custom_resource_definition(document)
        else:
            document["metadata"]["resourceVersion"] = existing.metadata.resource_version
            extensions.replace_custom_resource_definition(name, document)
        names.append(name)
    for name in names:
        wait_established(extensions, name, timeout_s)
    return names


def install_torch_runtime(api_client: client.ApiClient, path: Path) -> str:
    """Create (or replace) the ClusterTrainingRuntime in ``path`` (torch-distributed); returns its name."""
    document = yaml.safe_load(path.read_text())
    objects = client.CustomObjectsApi(api_client)
    name: str = document["metadata"]["name"]
    group, version = document["apiVersion"].split("/")
    try:
        existing = objects.get_cluster_custom_object(group, version, "clustertrainingruntimes", name)
    except ApiException as error:
        if error.status != 404:
            raise
        objects.create_cluster_custom_object(group, version, "clustertrainingruntimes", document)
    else:
        document["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        objects.replace_cluster_custom_object(group, version, "clustertrainingruntimes", name, document)
    return name


def install_trainer_v2(api_client: client.ApiClient, folder: Path | None) -> list[str]:
    """Kubeflow Trainer v2's CRDs (adapted for old servers, in memory) and its torch-distributed runtime."""
    crds, runtime = trainer_v2_files(folder)
    names = install_crds(api_client, crds)
    for _ in range(50):  # the new resource is served a moment after Established
        try:
            install_torch_runtime(api_client, runtime)
            break
        except ApiException as error:
            if error.status != 404:
                raise
            time.sleep(0.1)
    else:
        install_torch_runtime(api_client, runtime)
    return names


def wait_established(extensions: client.ApiextensionsV1Api, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        crd = extensions.read_custom_resource_definition(name)
        conditions = crd.status.conditions or [] if crd.status else []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established after {timeout_s} s")
