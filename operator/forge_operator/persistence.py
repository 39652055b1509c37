"""Where kopf keeps its own bookkeeping on a ForgeJob: handler progress and the last handled spec, in annotations.

kopf's diff base (the annotation ``forge.dev/last-handled-configuration``) is a copy of the spec that the next event
is compared with. Literal ``spec.env[].value``s (often credentials written by mistake) are replaced by a digest
there: a changed value still differs (so the update handler runs), but the value itself is not copied into an
annotation, where every ``kubectl get -o yaml`` and every tool that logs metadata would show it again.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import kopf

PREFIX = "forge.dev"
DIFFBASE_KEY = "last-handled-configuration"
REDACTED_PREFIX = "sha256:"


def redacted_value(value: str) -> str:
    """What stands for a literal env value in the diff base: a short digest (equal values, equal digests)."""
    return REDACTED_PREFIX + hashlib.sha256(value.encode()).hexdigest()[:16]


def redact_env_values(essence: Any) -> Any:
    """A copy of a kopf essence ({"spec": ...}) whose spec.env[].value are digests; anything else unchanged."""
    result = copy.deepcopy(essence)
    spec = result.get("spec") if isinstance(result, dict) else None
    env = spec.get("env") if isinstance(spec, dict) else None
    if isinstance(env, list):
        for var in env:
            if isinstance(var, dict) and isinstance(var.get("value"), str):
                var["value"] = redacted_value(var["value"])
    return result


class RedactedDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):  # type: ignore[misc]  # kopf is untyped here
    """kopf's annotation diff base, with literal env values replaced by their digests."""

    def __init__(self) -> None:
        super().__init__(prefix=PREFIX, key=DIFFBASE_KEY)

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        redacted: kopf.BodyEssence = redact_env_values(essence)
        return redacted
