"""Every child job event (a PyTorchJob's or a TrainJob's, through its backend): mirror its conditions (and Kueue's
hold) into the owning ForgeJob; on deletion mirror the final conditions it carries, release the operator's finalizer,
and re-create it only if the run never finished."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from forge_operator.api import API_VERSION, KIND
from forge_operator.backends import Backend
from forge_operator.context import OperatorContext
from forge_operator.handlers import handle_reconcile_forgejob
from forge_operator.handlers.common import (
    child_deleting,
    parse_status,
    settle_deleted_child,
    write_status,
)
from forge_operator.kube import controller_of
from forge_operator.render import QUEUE_LABEL
from forge_operator.status import is_terminal


def handler_name(backend: Backend) -> str:
    """pytorchjob, trainjob: the label of this watcher's metrics."""
    return backend.name


def owner_name(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the ForgeJob controlling this child job, if one does."""
    controller = controller_of(job)
    if controller is None or controller.get("kind") != KIND or controller.get("apiVersion") != API_VERSION:
        return None
    return controller["name"], controller["uid"]


def sync_child(
    ctx: OperatorContext,
    backend: Backend,
    event_type: str | None,
    job: Mapping[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    owner = owner_name(job)
    if owner is None:
        return
    name, uid = owner
    namespace = job["metadata"]["namespace"]
    handler = handler_name(backend)
    if event_type == "DELETED" or child_deleting(job):
        # Mirror the final conditions it carries before anything decides whether to re-create it.
        mine = settle_deleted_child(ctx, backend, job, uid, handler)
        if event_type != "DELETED" or not mine:
            return  # the DELETED event follows once the finalizers are gone; or the owner went first (GC)
        forgejob = ctx.kube.get("ForgeJob", namespace, name)
        if forgejob is None or is_terminal(parse_status(forgejob.get("status"))):
            return  # finished and cleaned up (ttlSecondsAfterFinished): nothing to re-run
        logger.warning("%s %s/%s deleted while %s/%s runs: reconciling", backend.kind, namespace, name, namespace, name)
        handle_reconcile_forgejob.reconcile(ctx, forgejob, logger)
        return
    labels = (job.get("metadata") or {}).get("labels") or {}
    if not (job.get("status") or {}).get("conditions") and QUEUE_LABEL not in labels:
        return  # just created: nothing to mirror yet (spares a read of the ForgeJob per new child job)
    write_status(ctx, namespace, name, handler, uid=uid, child=backend.report(job))
