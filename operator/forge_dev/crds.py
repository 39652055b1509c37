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


def minimal_pytorchjob_crd_path() -> Path:
    """Forge's own permissive PyTorchJob CRD, for machines without Kubeflow's real one."""
    return Path(str(resources.files("forge_dev") / "data" / MINIMAL_PYTORCHJOB_CRD))


def load_crd_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition document in the given YAML files, in order."""
    documents: list[dict[str, Any]] = []
    for path in paths:
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            if document.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{path}: expected kind CustomResourceDefinition, got {document.get('kind')!r}")
            documents.append(document)
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


def wait_established(extensions: client.ApiextensionsV1Api, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        crd = extensions.read_custom_resource_definition(name)
        conditions = crd.status.conditions or [] if crd.status else []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established after {timeout_s} s")
