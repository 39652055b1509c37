"""Every ForgeJob event: derive what follows from the trainer's reports (selected checkpoint, forgetting, state).

The event's body is checked first; only when it implies a change is the object re-read and patched, so the
operator's own status writes (which come back as events) cost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_operator import metrics
from forge_operator.context import OperatorContext
from forge_operator.handlers.common import compute_change, parse_status, write_status

HANDLER = "status"


def sync_status(ctx: OperatorContext, event_type: str | None, body: Mapping[str, Any]) -> None:
    metadata = body.get("metadata") or {}
    namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
    if event_type == "DELETED":
        metrics.forget(namespace, name)
        return
    metrics.record_status(namespace, name, parse_status(body.get("status")))
    if compute_change(body).empty:
        return
    write_status(ctx, namespace, name, HANDLER, uid=metadata.get("uid"))
