"""Pieces shared by the handlers: parsing bodies, writing the status, posting Events."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import kopf
from pydantic import ValidationError

from forge_operator import conditions, metrics
from forge_operator.api import ForgeJobSpec, ForgeJobStatus
from forge_operator.backends import Backend, ChildReport
from forge_operator.context import OperatorContext
from forge_operator.render import FINAL_STATUS_FINALIZER
from forge_operator.status import Acceptance, StatusChange, Transition, desired_status
from forge_operator.validation import parse_spec


class UnreadableStatusError(ValueError):
    """The status does not match the models (e.g. an operator older than the CRD): never overwrite it blindly."""


def parse_status(raw: Any) -> ForgeJobStatus:
    try:
        return ForgeJobStatus.model_validate(raw or {})
    except ValidationError as error:
        raise UnreadableStatusError(f"unreadable ForgeJob status: {error}") from error


def parse_spec_or_none(raw: Any) -> ForgeJobSpec | None:
    parsed = parse_spec(raw)
    return parsed if isinstance(parsed, ForgeJobSpec) else None


def post_events(body: Mapping[str, Any], transitions: Sequence[Transition]) -> None:
    for transition in transitions:
        post = kopf.warn if transition.warning else kopf.info
        post(dict(body), reason=transition.reason, message=transition.message)


def compute_change(
    body: Mapping[str, Any], *, acceptance: Acceptance | None = None, child: ChildReport | None = None
) -> StatusChange:
    metadata = body.get("metadata") or {}
    return desired_status(
        parse_status(body.get("status")),
        parse_spec_or_none(body.get("spec")),
        generation=metadata.get("generation"),
        at=conditions.now(),
        acceptance=acceptance,
        child=child,
    )


def write_status(
    ctx: OperatorContext,
    namespace: str,
    name: str,
    handler: str,
    *,
    uid: str | None = None,
    acceptance: Acceptance | None = None,
    child: ChildReport | None = None,
) -> StatusChange | None:
    """Recompute and write the operator's status fields from a fresh read; post the transitions as Events.

    ``uid`` guards against writing into a newer ForgeJob of the same name. Returns None when the ForgeJob is gone.
    """

    def compute(body: dict[str, Any]) -> StatusChange:
        if uid is not None and body["metadata"].get("uid") != uid:
            return StatusChange({})
        return compute_change(body, acceptance=acceptance, child=child)

    written, change = ctx.kube.update_status(namespace, name, compute, ctx.settings.status_conflict_retries)
    if written is None or change is None:
        return None
    if not change.empty:
        metrics.STATUS_PATCHES.labels(handler=handler).inc()
        post_events(written, change.transitions)
    metrics.record_status(namespace, name, parse_status(written.get("status")))
    return change


@contextmanager
def guard(handler: str, body: Mapping[str, Any]) -> Iterator[None]:
    """Time a handler run; count an escaping error by kind and post it as a Warning Event, then re-raise it
    (kopf retries the handler). TemporaryErrors were already reported where they were raised."""
    with metrics.timed(handler):
        try:
            yield
        except kopf.TemporaryError:
            raise
        except Exception as error:
            metrics.ERRORS.labels(kind=metrics.error_kind(error)).inc()
            if (body.get("kind") or "") == "ForgeJob":
                kopf.exception(
                    dict(body), reason="ReconcileError", message=f"{handler}: {type(error).__name__}: {error}"
                )
            raise


def child_deleting(job: Mapping[str, Any]) -> bool:
    return bool((job.get("metadata") or {}).get("deletionTimestamp"))


def owned_by(forgejob: Mapping[str, Any] | None, uid: str) -> bool:
    """The ForgeJob exists, is the one with this uid, and is not being deleted."""
    if forgejob is None:
        return False
    metadata = forgejob.get("metadata") or {}
    return metadata.get("uid") == uid and not metadata.get("deletionTimestamp")


def settle_deleted_child(
    ctx: OperatorContext, backend: Backend, job: Mapping[str, Any], owner_uid: str, handler: str
) -> bool:
    """A child job being deleted (or just deleted): mirror the conditions it carries into its ForgeJob first (the
    final Succeeded/Failed of a run that TTL clean-up removes), then release the operator's finalizer.

    Returns whether the ForgeJob is still there to reconcile. The finalizer is released only after the mirror was
    written, so a failed write keeps the child job (and its final conditions) for the next attempt.
    """
    metadata = job["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    controller = next((r for r in metadata.get("ownerReferences") or [] if r.get("controller")), None)
    forgejob_name = (controller or {}).get("name", name)
    forgejob = ctx.kube.get("ForgeJob", namespace, forgejob_name)
    mine = owned_by(forgejob, owner_uid)
    if mine and (job.get("status") or {}).get("conditions"):
        write_status(ctx, namespace, forgejob_name, handler, uid=owner_uid, child=backend.report(job))
    if FINAL_STATUS_FINALIZER in (metadata.get("finalizers") or []):
        ctx.kube.set_finalizer(backend.kind, namespace, name, FINAL_STATUS_FINALIZER, present=False)
    return mine
