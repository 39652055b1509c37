"""Every PyTorchJob event: mirror its conditions (and Kueue's hold) into the owning ForgeJob; on deletion mirror the
final conditions it carries, release the operator's finalizer, and re-create it only if the run never finished."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from forge_operator.api import API_VERSION, KIND
from forge_operator.context import OperatorContext
from forge_operator.handlers import handle_reconcile_forgejob
from forge_operator.handlers.common import (
    parse_status,
    pytorchjob_deleting,
    settle_deleted_pytorchjob,
    write_status,
)
from forge_operator.kube import controller_of
from forge_operator.render import QUEUE_LABEL
from forge_operator.status import is_terminal

HANDLER = "pytorchjob"


def owner_name(pytorchjob: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the ForgeJob controlling this PyTorchJob, if one does."""
    controller = controller_of(pytorchjob)
    if controller is None or controller.get("kind") != KIND or controller.get("apiVersion") != API_VERSION:
        return None
    return controller["name"], controller["uid"]


def sync_pytorchjob(
    ctx: OperatorContext,
    event_type: str | None,
    pytorchjob: Mapping[str, Any],
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    owner = owner_name(pytorchjob)
    if owner is None:
        return
    name, uid = owner
    namespace = pytorchjob["metadata"]["namespace"]
    if event_type == "DELETED" or pytorchjob_deleting(pytorchjob):
        # Mirror the final conditions it carries before anything decides whether to re-create it.
        mine = settle_deleted_pytorchjob(ctx, pytorchjob, uid, HANDLER)
        if event_type != "DELETED" or not mine:
            return  # the DELETED event follows once the finalizers are gone; or the owner went first (GC)
        forgejob = ctx.kube.get("ForgeJob", namespace, name)
        if forgejob is None or is_terminal(parse_status(forgejob.get("status"))):
            return  # finished and cleaned up (ttlSecondsAfterFinished): nothing to re-run
        logger.warning("PyTorchJob %s/%s deleted while %s/%s runs: reconciling", namespace, name, namespace, name)
        handle_reconcile_forgejob.reconcile(ctx, forgejob, logger)
        return
    labels = (pytorchjob.get("metadata") or {}).get("labels") or {}
    if not (pytorchjob.get("status") or {}).get("conditions") and QUEUE_LABEL not in labels:
        return  # just created: nothing to mirror yet (spares a read of the ForgeJob per new PyTorchJob)
    write_status(ctx, namespace, name, HANDLER, uid=uid, pytorchjob=pytorchjob)
