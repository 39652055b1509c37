"""The stall check, every FORGE_LIVENESS_CHECK_SECONDS per ForgeJob: judge from the body kopf holds (no API call
while the run moves), and on a stall re-judge from a fresh read, record the decision in the status, then act.

A restart is recorded (status.stallRestarts, status.lastStallRestart with the pods' uids) in the same conditional
write that sets Progressing=False, before any pod is deleted; a later check that finds a recorded restart with no
report since it deletes whatever of those pods is left (an operator restart in between finishes the restart and
never counts it twice). The rules are in ``forge_operator.liveness``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from forge_operator import liveness, metrics
from forge_operator.api import ForgeJobSpec, PodRef
from forge_operator.child_pods import child_pods, lead_pod, pod_selector, restart_pods, stop_child
from forge_operator.context import OperatorContext
from forge_operator.handlers.common import parse_spec_or_none, parse_status, post_events
from forge_operator.handlers.handle_reconcile_forgejob import backend_of
from forge_operator.status import StatusChange

HANDLER = "liveness"
Logger = logging.Logger | logging.LoggerAdapter[Any]


def _limits(ctx: OperatorContext) -> liveness.Limits:
    return liveness.Limits(stall_floor_seconds=float(ctx.settings.stall_floor_seconds))


def _change(
    ctx: OperatorContext, body: Mapping[str, Any], spec: ForgeJobSpec, pods: list[PodRef]
) -> liveness.LivenessChange:
    metadata = body.get("metadata") or {}
    status = parse_status(body.get("status"))
    kind = backend_of(ctx, status, spec).kind
    child = status.pytorch_job or status.train_job or metadata.get("name", "")
    hint = liveness.logs_hint(metadata.get("namespace", ""), pod_selector(kind, child), lead_pod(kind, child))
    return liveness.liveness_change(
        status,
        spec.monitoring,
        _limits(ctx),
        datetime.now(UTC),
        pods=pods,
        logs_hint=hint,
        generation=metadata.get("generation"),
    )


def check(ctx: OperatorContext, body: Mapping[str, Any], logger: Logger) -> None:
    metadata = body.get("metadata") or {}
    namespace, name, uid = metadata.get("namespace", ""), metadata.get("name", ""), metadata.get("uid")
    spec = parse_spec_or_none(body.get("spec"))
    if spec is None or metadata.get("deletionTimestamp"):
        return
    first = _change(ctx, body, spec, [])
    if first.change.empty and first.verdict.action == "none":
        return  # moving (or not judged), and the status already says so: nothing to read or write
    status = parse_status(body.get("status"))
    kind = backend_of(ctx, status, spec).kind
    child = status.pytorch_job or status.train_job or name
    pods = child_pods(ctx.kube, kind, namespace, child) if first.verdict.action != "none" else []
    decided: list[liveness.LivenessChange] = []

    def compute(fresh: dict[str, Any]) -> StatusChange:
        decided.clear()
        if fresh["metadata"].get("uid") != uid:
            return StatusChange({})
        outcome = _change(ctx, fresh, spec, pods)
        decided.append(outcome)
        return outcome.change

    written, change = ctx.kube.update_status(namespace, name, compute, ctx.settings.status_conflict_retries)
    if written is None or change is None or not decided:
        return
    outcome = decided[0]
    if not change.empty:
        metrics.STATUS_PATCHES.labels(handler=HANDLER).inc()
        post_events(written, change.transitions)
        metrics.record_status(namespace, name, parse_status(written.get("status")))
    if outcome.delete_pods:
        deleted = restart_pods(ctx.kube, kind, namespace, outcome.delete_pods)
        if deleted:
            logger.warning(
                "%s/%s stalled (%s): deleted %d pod(s) of %s %s to restart it",
                namespace,
                name,
                outcome.verdict.why,
                deleted,
                kind,
                child,
            )
    if outcome.stop_child and stop_child(ctx.kube, kind, namespace, child):
        logger.warning("%s/%s stalled and failed: deleted %s %s", namespace, name, kind, child)
