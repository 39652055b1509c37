"""Create, resume, spec update: validate, resolve, create or adopt the children, toggle suspend.

Level-based: every run starts from what exists (the child job, the ConfigMap holding the accepted spec, the
status) and converges; running it twice, or after an operator restart, creates nothing twice. The child job is a
PyTorchJob or a TrainJob, by the ForgeJob's backend (``forge_operator.backends``): once the run started, the status
field naming the child (pytorchJob, trainJob) fixes the backend, whatever the operator's default becomes.

The spec-change rule: until the child job exists a ForgeJob may change freely (an invalid spec is re-checked on
every change). Once it exists only ``spec.suspend`` and ``spec.checkpoints.selection`` may change; any other
change is refused with Accepted=False/SpecChangeRefused naming the changed fields, and the run continues with the
accepted spec.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from forge_operator import metrics
from forge_operator.api import ForgeJobSpec, ForgeJobStatus, Resolved
from forge_operator.backends import BY_NAME, PYTORCHJOB, TRAINJOB, Backend, chosen
from forge_operator.context import OperatorContext
from forge_operator.defaults import resolve
from forge_operator.handlers.common import (
    child_deleting,
    parse_status,
    settle_deleted_child,
    write_status,
)
from forge_operator.kube import Ensured, Refusal, controller_of, namespace_terminating, refusal
from forge_operator.render import (
    ACCEPTED_SPEC_ANNOTATION,
    ACCEPTED_SPEC_KEY,
    FINAL_STATUS_FINALIZER,
    QUEUE_LABEL,
    SPEC_DIGEST_ANNOTATION,
    SUSPEND_ANNOTATION,
    Owner,
    build_support,
    changed_paths,
    config_map_name,
    frozen_spec,
    keep_started_choices,
    spec_digest,
    suspend_value,
)
from forge_operator.status import (
    REASON_ACCEPTED,
    REASON_CHILD_CONFLICT,
    REASON_INVALID_SPEC,
    REASON_SPEC_CHANGE_REFUSED,
    Acceptance,
    is_terminal,
)
from forge_operator.validation import FieldError, format_errors, parse_spec, validate

HANDLER = "reconcile"
RESYNC = "resync"
Logger = logging.Logger | logging.LoggerAdapter[Any]
CONFLICT_RETRY_SECONDS = 15


def backend_of(ctx: OperatorContext, status: ForgeJobStatus, current: ForgeJobSpec | list[FieldError]) -> Backend:
    """The run's backend: the one whose child the status names once started, else the spec's or the default."""
    if status.train_job is not None:
        return TRAINJOB
    if status.pytorch_job is not None:
        return PYTORCHJOB
    if isinstance(current, ForgeJobSpec):
        return chosen(current, ctx.settings.default_backend)
    return BY_NAME[ctx.settings.default_backend]


def accepted_run(generation: int, message: str, resolved: Resolved, backend: Backend, name: str) -> Acceptance:
    """Accepted=True, naming the child job in status.pytorchJob or status.trainJob by its backend."""
    if backend is TRAINJOB:
        return Acceptance(generation, True, REASON_ACCEPTED, message, resolved=resolved, train_job=name)
    return Acceptance(generation, True, REASON_ACCEPTED, message, resolved=resolved, pytorch_job=name)


def accepted_message(name: str, spec: ForgeJobSpec, resolved: Resolved, kind: str = PYTORCHJOB.kind) -> str:
    return (
        f"{kind} {name}: {spec.resources.nodes} node(s) x {spec.resources.gpus_per_node} GPU(s), "
        f"{spec.technique}, learningRate {resolved.learning_rate} ({resolved.learning_rate_source}), "
        f"globalBatchTokens {resolved.global_batch_tokens}, {spec.training.max_steps} steps"
    )


def refused_message(changes: list[str], errors: list[FieldError], kind: str = PYTORCHJOB.kind) -> str:
    what = ", ".join(changes) if changes else "the spec"
    message = (
        f"{what} changed after the {kind} was created; only spec.suspend and spec.checkpoints.selection may change "
        "on a started ForgeJob. "
        "The run continues with the accepted spec: revert the change, or delete and re-create the ForgeJob"
    )
    if errors:
        message += f" (the new spec is also invalid: {format_errors(errors)})"
    return message


def accepted_spec(config_map: Mapping[str, Any] | None) -> ForgeJobSpec | None:
    """The spec the run was started with, kept in its ConfigMap's data (in an annotation before)."""
    if config_map is None:
        return None
    text = (config_map.get("data") or {}).get(ACCEPTED_SPEC_KEY) or (
        (config_map.get("metadata") or {}).get("annotations") or {}
    ).get(ACCEPTED_SPEC_ANNOTATION)
    if not text:
        return None
    try:
        return ForgeJobSpec.model_validate_json(text)
    except ValueError:
        return None


def _record(ensured: Ensured, kind: str) -> None:
    if ensured.created:
        metrics.CHILDREN_CREATED.labels(kind=kind).inc()
    if ensured.conflict:
        metrics.ERRORS.labels(kind="child_conflict").inc()


def build_children(
    backend: Backend, owner: Owner, spec: ForgeJobSpec, resolved: Resolved, ctx: OperatorContext
) -> list[dict[str, Any]]:
    """Every child in creation order: the child job last, once what its pods need exists."""
    return [*build_support(owner, spec, resolved, ctx.options), backend.build(owner, spec, ctx.options)]


def start(ctx: OperatorContext, owner: Owner, generation: int, spec: ForgeJobSpec, backend: Backend) -> Acceptance:
    """First run of a valid spec: create (or adopt) every child, the child job last."""
    resolved = resolve(spec)
    for child in build_children(backend, owner, spec, resolved, ctx):
        kind = child["kind"]
        ensured = ctx.kube.ensure(child, owner.uid)
        _record(ensured, kind)
        if ensured.conflict:
            return Acceptance(generation, False, REASON_CHILD_CONFLICT, ensured.conflict, resolved=resolved)
        if kind == "ConfigMap" and not ensured.created and ensured.obj is not None:
            annotations = (ensured.obj.get("metadata") or {}).get("annotations") or {}
            if annotations.get(SPEC_DIGEST_ANNOTATION) != spec_digest(spec):
                # Left by an earlier attempt with another spec, before any child job existed: still ours to change.
                child["metadata"]["resourceVersion"] = ensured.obj["metadata"]["resourceVersion"]
                ctx.kube.replace(child)
    message = accepted_message(owner.name, spec, resolved, backend.kind)
    return accepted_run(generation, message, resolved, backend, owner.name)


def running_spec(
    config_map: Mapping[str, Any] | None, child: Mapping[str, Any] | None, current: ForgeJobSpec | None
) -> ForgeJobSpec | None:
    """The spec the run was started with: from its ConfigMap, else the current one if the child job agrees."""
    accepted = accepted_spec(config_map)
    if accepted is not None or current is None:
        return accepted
    digest = ((child or {}).get("metadata") or {}).get("annotations", {}).get(SPEC_DIGEST_ANNOTATION)
    if child is None or digest == spec_digest(current):
        return current  # nothing left records another spec: the current one is what runs
    return None


def judge_started(
    ctx: OperatorContext,
    owner: Owner,
    generation: int,
    status: ForgeJobStatus,
    current: ForgeJobSpec | list[FieldError],
    accepted: ForgeJobSpec | None,
    backend: Backend = PYTORCHJOB,
) -> Acceptance:
    """Accepted while the spec equals the running one (suspend aside); refused, naming the changes, otherwise."""
    if accepted is None or not isinstance(current, ForgeJobSpec):
        changes = ["spec"]
        errors = current if isinstance(current, list) else []
    else:
        changes = changed_paths(frozen_spec(accepted), frozen_spec(keep_started_choices(accepted, current)))
        errors = validate_spec(ctx, owner.name, current) if changes else []
    if changes or accepted is None:
        metrics.ERRORS.labels(kind="spec_change_refused").inc()
        message = refused_message(changes, errors, backend.kind)
        return Acceptance(generation, False, REASON_SPEC_CHANGE_REFUSED, message)
    resolved = resolve(accepted)  # from the accepted spec, so a foreign write to status.resolved is undone
    message = accepted_message(owner.name, accepted, resolved, backend.kind)
    return accepted_run(generation, message, resolved, backend, owner.name)


def validate_spec(ctx: OperatorContext, name: str, spec: ForgeJobSpec) -> list[FieldError]:
    """``validation.validate`` with the operator's settings."""
    settings = ctx.settings
    return validate(
        name,
        spec,
        settings.trainer_image,
        settings.pod_metadata_allowed_keys,
        default_backend=settings.default_backend,
        backends=settings.backends,
    )


def may_recreate(ctx: OperatorContext, owner: Owner) -> bool:
    """Whether a missing child job may be created again: only while no final condition was ever recorded.

    Read fresh, after the child job was seen missing: its final conditions are mirrored before its finalizer is
    released, so a ForgeJob read now holds them if the run ever ended.
    """
    fresh = ctx.kube.get("ForgeJob", owner.namespace, owner.name)
    if fresh is None or fresh["metadata"].get("uid") != owner.uid:
        return False
    return not is_terminal(parse_status(fresh.get("status")))


def continue_started(
    ctx: OperatorContext,
    owner: Owner,
    generation: int,
    status: ForgeJobStatus,
    current: ForgeJobSpec | list[FieldError],
    job: dict[str, Any] | None,
    body: Mapping[str, Any],
    backend: Backend = PYTORCHJOB,
) -> Acceptance:
    """A run that exists: check the spec against the running one, re-create missing children, apply suspend."""
    config_map = ctx.kube.get("ConfigMap", owner.namespace, config_map_name(owner.name))
    accepted = running_spec(config_map, job, current if isinstance(current, ForgeJobSpec) else None)
    acceptance = judge_started(ctx, owner, generation, status, current, accepted, backend)
    if is_terminal(status) or accepted is None:
        return acceptance
    if job is None and not may_recreate(ctx, owner):
        return acceptance
    resolved = resolve(accepted)
    for child in build_children(backend, owner, accepted, resolved, ctx):
        known = {"ConfigMap": config_map, backend.kind: job}.get(child["kind"])
        ensured = (
            ctx.kube.adopt(known, owner.uid)
            if known is not None
            else ctx.kube.ensure(child, owner.uid, read_first=True)
        )
        _record(ensured, child["kind"])
        if ensured.conflict:
            return Acceptance(generation, False, REASON_CHILD_CONFLICT, ensured.conflict)
        if ensured.created and child["kind"] == backend.kind:
            message = f"{backend.kind} {owner.name} was missing: re-created"
            kopf.warn(dict(body), reason="ChildRecreated", message=message)
            job = ensured.obj
    if job is not None:
        if FINAL_STATUS_FINALIZER not in (job["metadata"].get("finalizers") or []):
            ctx.kube.set_finalizer(backend.kind, owner.namespace, owner.name, FINAL_STATUS_FINALIZER, present=True)
        if isinstance(current, ForgeJobSpec):
            apply_suspend(ctx, owner, current.suspend, job, body, backend)
    return acceptance


def apply_suspend(
    ctx: OperatorContext,
    owner: Owner,
    suspend: bool,
    job: Mapping[str, Any],
    body: Mapping[str, Any],
    backend: Backend = PYTORCHJOB,
) -> None:
    """Write the child's suspend (runPolicy.suspend, a TrainJob's spec.suspend) only when spec.suspend changed since
    the operator last wrote it.

    Between two changes the field belongs to whoever else manages it (Kueue suspends a job it has not admitted or
    pre-empts, and un-suspends it on admission): a resume or a resync never touches it. A queued job is never
    un-suspended by the operator: Kueue does that when it admits the run.
    """
    metadata = job.get("metadata") or {}
    wanted = suspend_value(suspend)
    if (metadata.get("annotations") or {}).get(SUSPEND_ANNOTATION) == wanted:
        return
    queued = QUEUE_LABEL in (metadata.get("labels") or {})
    write = backend.report(job).suspended != suspend and (suspend or not queued)
    patch: dict[str, Any] = {"metadata": {"annotations": {SUSPEND_ANNOTATION: wanted}}}
    if write:
        patch["spec"] = backend.suspend_patch(suspend)
    ctx.kube.merge_patch(backend.kind, owner.namespace, owner.name, patch)
    kind = backend.kind
    if write:
        verb = "Suspending" if suspend else "Resuming"
        field = "runPolicy.suspend" if backend is PYTORCHJOB else "spec.suspend"
        kopf.info(dict(body), reason=verb, message=f"{verb} {kind} {owner.name} ({field}={suspend})")
    elif queued and not suspend:
        kopf.info(
            dict(body),
            reason="Resuming",
            message=f"{kind} {owner.name} is queued: Kueue un-suspends it when it admits the run",
        )


def reconcile_once(ctx: OperatorContext, body: Mapping[str, Any], logger: Logger) -> None:
    """One pass of ``reconcile``."""
    metadata = body["metadata"]
    if metadata.get("deletionTimestamp"):
        return
    owner = Owner(name=metadata["name"], namespace=metadata["namespace"], uid=metadata["uid"])
    generation = int(metadata.get("generation") or 0)
    status = parse_status(body.get("status"))
    current = parse_spec(body.get("spec"))
    backend = backend_of(ctx, status, current)
    invalid = validate_spec(ctx, owner.name, current) if isinstance(current, ForgeJobSpec) else current
    if status.pytorch_job is None and status.train_job is None and invalid:
        # Not started, and the spec cannot run (perhaps not with its backend): no API call to that backend.
        metrics.ERRORS.labels(kind="invalid_spec").inc()
        acceptance = Acceptance(generation, False, REASON_INVALID_SPEC, format_errors(invalid))
        write_status(ctx, owner.namespace, owner.name, HANDLER, uid=owner.uid, acceptance=acceptance)
        return
    job = ctx.kube.get(backend.kind, owner.namespace, owner.name)
    ours = job is not None and (controller_of(job) or {}).get("uid") == owner.uid
    if job is not None and ours and child_deleting(job):
        # Being deleted (TTL clean-up, a user): record its final conditions, let it go, then decide from the result.
        settle_deleted_child(ctx, backend, job, owner.uid, HANDLER)
        job = ctx.kube.get(backend.kind, owner.namespace, owner.name)
        ours = job is not None and (controller_of(job) or {}).get("uid") == owner.uid
        if job is not None and ours and child_deleting(job):
            raise kopf.TemporaryError(
                f"{backend.kind} still being deleted (another finalizer)", delay=CONFLICT_RETRY_SECONDS
            )
    if ours or status.pytorch_job is not None or status.train_job is not None:
        acceptance = continue_started(ctx, owner, generation, status, current, job if ours else None, body, backend)
    else:
        assert isinstance(current, ForgeJobSpec)  # an invalid spec returned above
        acceptance = start(ctx, owner, generation, current, backend)
    logger.debug(
        "%s/%s generation %d: %s %s", owner.namespace, owner.name, generation, acceptance.reason, acceptance.message
    )
    # One status write: the acceptance, and the child's conditions mirrored again (repairs a missed event).
    mirrored = backend.report(job) if ours and job is not None else None
    write_status(ctx, owner.namespace, owner.name, HANDLER, uid=owner.uid, acceptance=acceptance, child=mirrored)
    if acceptance.reason == REASON_CHILD_CONFLICT:
        raise kopf.TemporaryError(acceptance.message, delay=CONFLICT_RETRY_SECONDS)


def backoff_seconds(retry: int, ceiling: int) -> int:
    """5 s, 10 s, 20 s, ... up to ``ceiling``: how long to wait after the ``retry``-th refusal in a row."""
    return int(min(5 * 2 ** min(retry, 20), ceiling))


def report_refusal(ctx: OperatorContext, body: Mapping[str, Any], refused: Refusal, logger: Logger) -> None:
    """Accepted=Unknown with the refusal's message (one Event when it changes); only logged when even the status
    write is refused (an outage, a missing RBAC rule on forgejobs/status)."""
    metadata = body["metadata"]
    generation = int(metadata.get("generation") or 0)
    acceptance = Acceptance(generation, False, refused.reason, refused.message, unknown=True)
    try:
        write_status(ctx, metadata["namespace"], metadata["name"], HANDLER, uid=metadata["uid"], acceptance=acceptance)
    except (ApiException, urllib3.exceptions.HTTPError) as error:
        logger.warning("cannot record %s on the ForgeJob either: %s", refused.reason, error)


def reconcile(ctx: OperatorContext, body: Mapping[str, Any], logger: Logger, retry: int = 0) -> None:
    """Bring one ForgeJob's children and Accepted condition in line with its spec.

    When the cluster refuses (a missing CRD, missing RBAC, an unreachable API server) the ForgeJob says so in
    Accepted=Unknown and the reconcile is retried with an exponential back-off instead of kopf's fixed delay.
    """
    try:
        reconcile_once(ctx, body, logger)
    except (ApiException, urllib3.exceptions.HTTPError) as error:
        if isinstance(error, ApiException) and namespace_terminating(error):
            logger.info("namespace %s is being deleted: nothing to reconcile", body["metadata"]["namespace"])
            return
        refused = refusal(error)
        if refused is None:
            raise
        metrics.ERRORS.labels(kind=refused.reason).inc()
        report_refusal(ctx, body, refused, logger)
        delay = backoff_seconds(retry, ctx.settings.retry_max_seconds)
        raise kopf.TemporaryError(f"{refused.reason}: {refused.message} (next try in {delay} s)", delay=delay) from None
