"""The CRD is generated from the API models, and it follows the rules a structural schema and the API
conventions set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forge_operator import crd
from forge_operator.api import ForgeJobSpec, ForgeJobStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / "forgejob.yaml"


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node under ``schema`` with its field path."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    version = crd.build_crd()["spec"]["versions"][0]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def test_crds_folder_matches_the_models() -> None:
    assert CRD_FILE.read_text() == crd.render_yaml(), (
        "crds/forgejob.yaml drifted from operator/forge_operator/api.py: "
        "run `.venv/bin/python -m forge_operator.crd > crds/forgejob.yaml`"
    )


def test_crd_identity_and_subresources() -> None:
    document = yaml.safe_load(CRD_FILE.read_text())
    spec = document["spec"]
    assert document["metadata"]["name"] == "forgejobs.forge.dev"
    assert spec["group"] == "forge.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ForgeJob" and spec["names"]["shortNames"] == ["fj"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    default_columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_columns == ["State", "Step", "Forgetting", "Selected", "Age"]


def test_structural_schema(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        assert "$ref" not in node and "title" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf only for int-or-string"
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_every_field_is_documented(schema: dict[str, Any]) -> None:
    for section in ("spec", "status"):
        for path, node in nodes(schema["properties"][section], section):
            if path.endswith("[]") or path.endswith(".*"):
                continue
            assert node.get("description"), f"{path} has no description"
            assert "\n" not in node["description"].replace("\n\n", ""), f"{path}: wrapped description"


def test_spec_has_no_floats_and_every_number_is_bounded(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema["properties"]["spec"], "spec"):
        assert node.get("type") != "number", f"{path} is a float"
        if node.get("type") == "integer":
            assert "minimum" in node and "maximum" in node, f"{path} is unbounded"
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node or "pattern" in node, f"{path} has no length bound"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} has no maxItems"


def test_spec_defaults_and_required(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["model", "technique", "data", "checkpoints"]
    assert spec["properties"]["technique"]["enum"] == ["cpt", "sft", "lora"]
    for section in ("eval", "training", "forgetting", "resources", "runPolicy"):
        assert spec["properties"][section]["default"] == {}, f"spec.{section} must default to {{}} for its defaults"
    training = spec["properties"]["training"]["properties"]
    assert training["learningRate"]["default"] == "auto"
    assert spec["properties"]["forgetting"]["properties"]["action"]["enum"] == ["stop", "warn", "rebalance"]
    selection = spec["properties"]["checkpoints"]["properties"]["selection"]
    assert selection["enum"] == ["best-within-budget", "pareto", "last"]
    assert selection["default"] == "best-within-budget"
    forgetting = spec["properties"]["forgetting"]["properties"]
    assert (forgetting["gracePercent"]["default"], forgetting["divergenceFactor"]["default"]) == (10, 3)
    assert spec["properties"]["eval"]["properties"]["klTopK"]["default"] == 16
    candidates = spec["properties"]["checkpoints"]["properties"]["candidates"]
    assert candidates["default"] == {}, "spec.checkpoints.candidates must default to {} for its defaults"
    alphas = candidates["properties"]["interpolationAlphaPercents"]
    assert alphas["default"] == [25, 50, 75] and alphas["x-kubernetes-list-type"] == "set"
    assert (alphas["items"]["minimum"], alphas["items"]["maximum"], alphas["maxItems"]) == (1, 99, 16)
    limits = spec["properties"]["resources"]["properties"]["resources"]["properties"]["limits"]
    assert limits["additionalProperties"]["x-kubernetes-int-or-string"] is True


def test_conditions_follow_the_api_conventions(schema: dict[str, Any]) -> None:
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "reason", "lastTransitionTime"}
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert not [path for path, node in nodes(schema["properties"]["status"], "status") if "default" in node]


TRAINER_REPORT = {
    "progress": {"step": 1, "totalSteps": 2, "tokens": 3, "percent": 50.0, "etaSeconds": 1.5},
    "latest": {
        "domainLoss": 1.0,
        "generalLoss": 1.0,
        "forgettingPercent": 0.1,
        "domainGainPercent": 0.2,
        "tokensPerSecond": 10.5,
        "mfu": 0.3,
        "learningRate": 1e-5,
    },
    "checkpoints": [
        {
            "step": 1,
            "uri": "s3://b/k",
            "domainLoss": 1.0,
            "generalLoss": 1.0,
            "forgettingPercent": 0.1,
            "domainGainPercent": 0.2,
            "complete": True,
        }
    ],
    "baseline": {"domainLoss": 1.0, "generalLoss": 1.0},
    "lrProbe": {
        "learningRate": 4e-5,
        "multiplier": 2.0,
        "reason": "2x is the highest multiple projected within the forgetting budget",
        "multiples": [
            {
                "multiplier": 2.0,
                "learningRate": 4e-5,
                "projectedForgettingPercent": 1.5,
                "measuredForgettingPercent": 0.2,
            }
        ],
    },
}


def covered(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Paths of ``value`` that the schema would prune or that have the wrong type."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        missing = [f"{path}.{key}" for key in value if key not in properties]
        return missing + [
            m for k, v in value.items() if k in properties for m in covered(properties[k], v, f"{path}.{k}")
        ]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in covered(schema["items"], v, f"{path}[{i}]")]
    expected = {bool: "boolean", int: "integer", float: "number", str: "string"}[type(value)]
    accepted = {expected, "number"} if expected == "integer" else {expected}
    return [] if schema.get("type") in accepted else [f"{path} ({schema.get('type')} vs {expected})"]


def test_status_schema_keeps_every_field_the_trainer_reports(schema: dict[str, Any]) -> None:
    assert covered(schema["properties"]["status"], TRAINER_REPORT, "status") == []
    assert covered(schema["properties"]["status"], {"bogus": 1}, "status") == ["status.bogus"]  # the check can fail
    ForgeJobStatus.model_validate(TRAINER_REPORT)


def test_unsupported_schema_constructs_are_refused() -> None:
    with pytest.raises(crd.SchemaError, match="not structural"):
        crd.convert({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}, {}, "x")
    with pytest.raises(crd.SchemaError, match="unsupported"):
        crd.convert({"type": "number", "exclusiveMinimum": 0}, {}, "x")


def test_model_and_schema_agree_on_a_full_example() -> None:
    example = {
        "model": {"base": "s3://m/llama-3.2-1b/"},
        "technique": "lora",
        "lora": {"rank": 8},
        "data": {"domain": [{"uri": "s3://d/"}], "general": [{"uri": "s3://g/"}]},
        "checkpoints": {"output": "s3://o/"},
    }
    spec = ForgeJobSpec.model_validate(example)
    assert spec.lora is not None and spec.lora.alpha == 32
    assert spec.to_api()["training"]["learningRate"] == "auto"


def test_user_guide_field_reference_matches_the_models() -> None:
    from forge_operator.reference import rewrite

    guide = REPO_ROOT / "docs" / "user-guide.md"
    assert guide.read_text() == rewrite(guide.read_text()), (
        "docs/user-guide.md's field reference drifted: run `.venv/bin/python -m forge_operator.reference "
        "docs/user-guide.md`"
    )
