"""Pure helpers for status conditions (Kubernetes API conventions: a list keyed by type).

``lastTransitionTime`` changes only when a condition's status flips; reason, message and observedGeneration are
refreshed in place. Callers test a condition with ``is_true``: never by position in the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from forge_operator.api import CONDITION_MESSAGE_MAX, Condition, ConditionStatus


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the API server writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> str:
    return timestamp(datetime.now(UTC))


def find(conditions: Sequence[Condition], condition_type: str) -> Condition | None:
    return next((c for c in conditions if c.type == condition_type), None)


def is_true(conditions: Sequence[Condition], condition_type: str) -> bool:
    found = find(conditions, condition_type)
    return found is not None and found.status == "True"


CUT_MARK = " [...] (cut to fit the condition)"


def fit_message(message: str) -> str:
    """``message``, or its start and a note saying it was cut when it is longer than a condition may hold."""
    if len(message) <= CONDITION_MESSAGE_MAX:
        return message
    return message[: CONDITION_MESSAGE_MAX - len(CUT_MARK)] + CUT_MARK


def upsert(
    conditions: Sequence[Condition],
    condition_type: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    at: str,
    observed_generation: int | None = None,
) -> list[Condition]:
    """A new list with ``condition_type`` set; its position is kept, a new type goes last.

    ``at`` becomes lastTransitionTime only when the status changes (or the type is new).
    """
    existing = find(conditions, condition_type)
    transition = at if existing is None or existing.status != status else existing.last_transition_time
    updated = Condition(
        type=condition_type,
        status=status,
        reason=reason,
        message=fit_message(message),
        last_transition_time=transition,
        observed_generation=observed_generation,
    )
    if existing is None:
        return [*conditions, updated]
    return [updated if c.type == condition_type else c for c in conditions]


def remove(conditions: Sequence[Condition], condition_type: str) -> list[Condition]:
    return [c for c in conditions if c.type != condition_type]
