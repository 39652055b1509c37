"""Operator start-up: kopf settings, the API client, the metrics endpoint."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from forge_operator import metrics
from forge_operator.context import OperatorContext
from forge_operator.kube import Kube, api_client
from forge_operator.settings import Settings

PREFIX = "forge.dev"


def configure(settings: kopf.OperatorSettings, memo: Any, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    forge = Settings()
    logging.getLogger().setLevel(forge.log_level)
    # Handler progress and the last handled spec live in annotations: the status belongs to the API schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.reporting_component = "forge-operator"
    settings.posting.level = logging.INFO
    settings.execution.max_workers = forge.workers
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    memo.forge = OperatorContext(settings=forge, kube=Kube(api_client(pool_size=forge.workers + 4)))
    metrics.serve(forge.metrics_port)
    logger.info(
        "forge-operator: namespaces=%s metrics port=%s trainer image=%s",
        ",".join(forge.namespaces) or "(all)",
        forge.metrics_port,
        forge.trainer_image,
    )
