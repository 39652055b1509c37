"""Every manifest in examples/ is a valid ForgeJob: the real API server's CRD schema and the operator's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from forge_operator.validation import parse_spec, validate
from tests.conftest import REPO_ROOT, LocalCluster

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert len(documents) == 1, f"{path.name}: expected one ForgeJob document"
    document: dict[str, Any] = documents[0]
    assert document["kind"] == "ForgeJob" and document["apiVersion"] == "forge.dev/v1alpha1"
    return document


def test_there_are_examples_for_every_technique() -> None:
    techniques = {_load(path)["spec"]["technique"] for path in EXAMPLES}
    assert techniques == {"cpt", "sft", "lora"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_the_operators_semantic_checks(path: Path) -> None:
    document = _load(path)
    spec = parse_spec(document["spec"])
    assert not isinstance(spec, list), f"{path.name}: {spec}"
    errors = validate(document["metadata"]["name"], spec, default_image="forge-trainer:dev")
    assert errors == [], f"{path.name}: {errors}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_api_server_unchanged(path: Path, cluster: LocalCluster, namespace: str) -> None:
    document = _load(path)
    document["metadata"]["namespace"] = namespace
    with cluster.api_client() as api:
        objects = client.CustomObjectsApi(api)
        created = objects.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", document)
    # Kubernetes 1.20 prunes unknown fields silently: a misspelled field would vanish. Every field written in the
    # example must come back (the server may add defaults, but may not drop anything).
    _assert_contains(created["spec"], document["spec"], "spec")


def _assert_contains(stored: Any, written: Any, path: str) -> None:
    if isinstance(written, dict):
        assert isinstance(stored, dict), f"{path}: stored as {type(stored).__name__}"
        for key, value in written.items():
            assert key in stored, f"{path}.{key} was pruned by the API server (unknown field?)"
            _assert_contains(stored[key], value, f"{path}.{key}")
    elif isinstance(written, list):
        assert isinstance(stored, list) and len(stored) == len(written), f"{path}: list changed"
        for index, (stored_item, written_item) in enumerate(zip(stored, written, strict=True)):
            _assert_contains(stored_item, written_item, f"{path}[{index}]")
    else:
        assert stored == written, f"{path}: {written!r} stored as {stored!r}"
