"""kopf's diff base without literal env values, and the accepted spec read from the ConfigMap's data."""

from __future__ import annotations

import json
from typing import Any

import kopf

from forge_operator.api import ForgeJobSpec
from forge_operator.handlers.handle_reconcile_forgejob import accepted_spec
from forge_operator.persistence import RedactedDiffBaseStorage, redact_env_values, redacted_value
from forge_operator.render import (
    ACCEPTED_SPEC_ANNOTATION,
    canonical_json,
    changed_paths,
    frozen_spec,
    keep_started_choices,
)
from tests.operator.helpers import forgejob

SECRET = "hunter2-but-longer"


def body(value: str) -> dict[str, Any]:
    job = forgejob(
        "envy",
        env=[
            {"name": "TOKEN", "value": value},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
    )
    job["metadata"].update({"namespace": "team", "uid": "u-1", "annotations": {"team": "nlp"}})
    return job


def test_literal_env_values_become_digests_and_nothing_else_changes() -> None:
    essence = {"spec": body(SECRET)["spec"], "metadata": {"labels": {"a": "b"}}}
    redacted = redact_env_values(essence)
    assert SECRET not in json.dumps(redacted)
    assert redacted["spec"]["env"][0] == {"name": "TOKEN", "value": redacted_value(SECRET)}
    assert redacted["spec"]["env"][1] == essence["spec"]["env"][1]
    assert {k: v for k, v in redacted["spec"].items() if k != "env"} == {
        k: v for k, v in essence["spec"].items() if k != "env"
    }
    assert essence["spec"]["env"][0]["value"] == SECRET, "the input is not modified"
    assert redact_env_values({"spec": {}}) == {"spec": {}}


def test_the_kopf_diff_base_differs_when_a_value_changes_but_never_holds_it() -> None:
    storage = RedactedDiffBaseStorage()
    first = storage.build(body=kopf.Body(body(SECRET)))
    same = storage.build(body=kopf.Body(body(SECRET)))
    changed = storage.build(body=kopf.Body(body(SECRET + "!")))
    assert SECRET not in json.dumps(first)
    assert first == same and first != changed, "kopf still sees a changed value as a spec change"
    patch = kopf.Patch()
    storage.store(body=kopf.Body(body(SECRET)), patch=patch, essence=first)
    stored = patch["metadata"]["annotations"]["forge.dev/last-handled-configuration"]
    assert SECRET not in stored and redacted_value(SECRET) in stored


def test_accepted_spec_is_read_from_data_and_from_an_older_operators_annotation() -> None:
    spec = ForgeJobSpec.model_validate(body(SECRET)["spec"])
    text = canonical_json(frozen_spec(spec))
    from_data = accepted_spec({"metadata": {}, "data": {"accepted-spec.json": text}})
    from_annotation = accepted_spec({"metadata": {"annotations": {ACCEPTED_SPEC_ANNOTATION: text}}, "data": {}})
    assert from_data is not None and frozen_spec(from_data) == frozen_spec(spec)
    assert from_annotation is not None and frozen_spec(from_annotation) == frozen_spec(spec)
    assert accepted_spec({"metadata": {}, "data": {"accepted-spec.json": "{not json"}}) is None
    assert accepted_spec(None) is None


def test_a_field_left_to_the_operator_keeps_the_value_the_run_started_with() -> None:
    started = ForgeJobSpec.model_validate(body(SECRET)["spec"] | {"technique": "sft"})
    assert started.data.mix_by is None
    # what an operator from before the technique-dependent default recorded for the same spec
    recorded = started.model_copy(update={"data": started.data.model_copy(update={"mix_by": "tokens"})})
    assert changed_paths(frozen_spec(recorded), frozen_spec(started)) == ["spec.data.mixBy"]
    kept = keep_started_choices(recorded, started)
    assert changed_paths(frozen_spec(recorded), frozen_spec(kept)) == []
    named = started.model_copy(update={"data": started.data.model_copy(update={"mix_by": "lossTokens"})})
    assert changed_paths(frozen_spec(recorded), frozen_spec(keep_started_choices(recorded, named))) == [
        "spec.data.mixBy"
    ], "a value the spec names is still a change"
    assert keep_started_choices(started, started) == started
