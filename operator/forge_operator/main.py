# mypy: disallow-untyped-decorators=False
"""kopf registrations only: each handler hands its arguments to a module in ``forge_operator.handlers``.

Run with ``forge-operator`` (settings from FORGE_* variables) or ``kopf run -m forge_operator.main``.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from forge_operator.api import GROUP, PLURAL, VERSION
from forge_operator.backends import BY_NAME, Backend
from forge_operator.context import OperatorContext
from forge_operator.handlers import (
    handle_liveness,
    handle_reconcile_forgejob,
    handle_startup,
    handle_sync_child,
    handle_sync_status,
)
from forge_operator.handlers.common import guard
from forge_operator.render import JOB_LABEL, MANAGED_BY
from forge_operator.settings import Settings

Logger = logging.Logger | logging.LoggerAdapter[Any]


def _ctx(memo: Any) -> OperatorContext:
    ctx: OperatorContext = memo.forge
    return ctx


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    handle_startup.configure(settings, memo, logger)


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=5)
def forgejob_spec(body: kopf.Body, memo: Any, logger: Logger, retry: int, **_: Any) -> None:
    with guard(handle_reconcile_forgejob.HANDLER, body):
        handle_reconcile_forgejob.reconcile(_ctx(memo), body, logger, retry)


def _resync_seconds() -> float:
    """The timer's interval is fixed when kopf registers it, at import: read from FORGE_RESYNC_SECONDS."""
    return float(Settings().resync_seconds)


@kopf.timer(GROUP, VERSION, PLURAL, interval=_resync_seconds(), initial_delay=_resync_seconds())
def forgejob_resync(body: kopf.Body, memo: Any, logger: Logger, retry: int, **_: Any) -> None:
    with guard(handle_reconcile_forgejob.RESYNC, body):
        handle_reconcile_forgejob.reconcile(_ctx(memo), body, logger, retry)


def _liveness_seconds() -> float:
    """Read from FORGE_LIVENESS_CHECK_SECONDS at import, like the resync interval."""
    return float(Settings().liveness_check_seconds)


@kopf.timer(GROUP, VERSION, PLURAL, interval=_liveness_seconds(), initial_delay=_liveness_seconds())
def forgejob_liveness(body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    with guard(handle_liveness.HANDLER, body):
        handle_liveness.check(_ctx(memo), body, logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
def forgejob_event(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    with guard(handle_sync_status.HANDLER, body):
        handle_sync_status.sync_status(_ctx(memo), type, body)


def _watch_child_jobs(backend: Backend) -> None:
    """One event handler per enabled backend (FORGE_BACKENDS, read at import like the resync interval): the
    operator watches only the child kinds it may create, so the chart grants RBAC only for those."""
    group, version = backend.api_path.removeprefix("/apis/").split("/")

    def child_event(type: str | None, body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
        with guard(handle_sync_child.handler_name(backend), body):
            handle_sync_child.sync_child(_ctx(memo), backend, type, body, logger)

    labels = {"app.kubernetes.io/managed-by": MANAGED_BY, JOB_LABEL: kopf.PRESENT}
    kopf.on.event(group, version, backend.plural, labels=labels, id=f"{backend.name}_event")(child_event)


for _name in Settings().backends:
    _watch_child_jobs(BY_NAME[_name])


def run() -> None:
    """The ``forge-operator`` command: kopf in standalone mode, configured from FORGE_* variables."""
    settings = Settings()
    kopf.configure(debug=settings.log_level == "DEBUG", quiet=settings.log_level in ("WARNING", "ERROR"))
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )
