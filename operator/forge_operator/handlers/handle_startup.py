"""Operator start-up: kopf settings, the API client, the metrics endpoint."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from forge_operator import metrics
from forge_operator.api import GROUP, PLURAL, VERSION
from forge_operator.backends import BY_NAME, Backend
from forge_operator.context import OperatorContext
from forge_operator.kube import Kube, api_client, refusal
from forge_operator.persistence import RedactedDiffBaseStorage
from forge_operator.settings import Settings

PREFIX = "forge.dev"
# (API group/version path, plural, what a person installs to get it)
REQUIRED_APIS = (
    ("/apis/kubeflow.org/v1", "pytorchjobs", "the Kubeflow training-operator (PyTorchJob CRD kubeflow.org/v1)"),
    (f"/apis/{GROUP}/{VERSION}", PLURAL, "Forge's CRD (crds/forgejob.yaml, or the Helm chart)"),
)
# (verb, group, resource) the reconcile cannot do without, checked with SelfSubjectAccessReviews.
REQUIRED_ACCESS = (
    ("create", "kubeflow.org", "pytorchjobs"),
    ("patch", "kubeflow.org", "pytorchjobs"),
    ("watch", "kubeflow.org", "pytorchjobs"),
    ("watch", GROUP, PLURAL),
    ("patch", GROUP, f"{PLURAL}/status"),
    ("create", "", "configmaps"),
    ("create", "", "serviceaccounts"),
    ("create", "rbac.authorization.k8s.io", "roles"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("create", "", "events"),
)


def required_apis(backend: Backend) -> tuple[tuple[str, str, str], ...]:
    """Forge's API and the default backend's child job API (``REQUIRED_APIS`` for pytorchjob)."""
    hint = backend.install_hint.removeprefix("Install ").split(", or set", 1)[0]
    return ((backend.api_path, backend.plural, hint), REQUIRED_APIS[1])


def required_access(backend: Backend) -> tuple[tuple[str, str, str], ...]:
    """``REQUIRED_ACCESS`` with the default backend's child job kind."""
    group = backend.api_path.removeprefix("/apis/").split("/")[0]
    return tuple(
        (verb, group, backend.plural) if resource == "pytorchjobs" else (verb, g, resource)
        for verb, g, resource in REQUIRED_ACCESS
    )


def check_cluster(
    kube: Kube,
    namespace: str,
    apis: tuple[tuple[str, str, str], ...] = REQUIRED_APIS,
    access: tuple[tuple[str, str, str], ...] = REQUIRED_ACCESS,
) -> list[str]:
    """What the cluster lacks for Forge to work: missing APIs, missing permissions, an unreachable API server.

    Each entry is a sentence saying what to install or grant. ``namespace`` is where the permissions are checked
    ("" for cluster-wide).
    """
    problems: list[str] = []
    for prefix, plural, provider in apis:
        try:
            served = {r.get("name") for r in kube.request("GET", prefix).get("resources") or []}
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            refused = refusal(error)
            if refused is not None and refused.reason != "MissingAPI":
                return [refused.message]
            served = set()
        if plural not in served:
            problems.append(f"{prefix}/{plural} is not served: install {provider}")
    for verb, group, resource in access:
        plural, _, subresource = resource.partition("/")
        attributes = {"verb": verb, "group": group, "resource": plural, "subresource": subresource}
        if namespace:
            attributes["namespace"] = namespace
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        try:
            answer = kube.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            refused = refusal(error)
            problems.append(refused.message if refused else f"cannot check RBAC: {error}")
            break
        if not (answer.get("status") or {}).get("allowed"):
            where = f"in namespace {namespace}" if namespace else "cluster-wide"
            what = f"{group or 'core'}/{resource}"
            problems.append(f"RBAC: the operator may not {verb} {what} {where}")
    return problems


def startup_line(problems: list[str], namespaces: list[str]) -> tuple[int, str]:
    """The log level and the line that says whether this cluster can run ForgeJobs, and what to fix if not."""
    scope = ",".join(namespaces) or "(all)"
    if not problems:
        return logging.INFO, f"forge-operator: cluster check passed (APIs served, RBAC granted) for namespaces {scope}"
    return logging.ERROR, (
        f"forge-operator: cluster check FAILED for namespaces {scope}: {'; '.join(problems)}. ForgeJobs show "
        "Accepted=Unknown with the refused request until this is fixed; the operator retries with back-off"
    )


def configure(settings: kopf.OperatorSettings, memo: Any, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    forge = Settings()
    logging.getLogger().setLevel(forge.log_level)
    # Handler progress and the last handled spec live in annotations: the status belongs to the API schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    # The last handled spec, with literal env values as digests (forge_operator.persistence).
    settings.persistence.diffbase_storage = RedactedDiffBaseStorage()
    settings.posting.reporting_component = "forge-operator"
    settings.posting.level = logging.INFO
    # Only the operator's own Events (state transitions, refusals, once each); not kopf's log line per retry.
    settings.posting.loggers = False
    settings.execution.max_workers = forge.workers
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    kube = Kube(api_client(pool_size=forge.workers + 4))
    memo.forge = OperatorContext(settings=forge, kube=kube)
    metrics.serve(forge.metrics_port)
    logger.info(
        "forge-operator: namespaces=%s metrics port=%s trainer image=%s",
        ",".join(forge.namespaces) or "(all)",
        forge.metrics_port,
        forge.trainer_image,
    )
    backend = BY_NAME[forge.default_backend]
    problems = check_cluster(
        kube,
        forge.namespaces[0] if forge.namespaces else "",
        apis=REQUIRED_APIS if backend is BY_NAME["pytorchjob"] else required_apis(backend),
        access=required_access(backend),
    )
    level, line = startup_line(problems, forge.namespaces)
    logger.log(level, line)
