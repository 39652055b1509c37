"""The operator's only door to the API server: plain JSON requests, create-or-adopt, conflict-safe status writes."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from forge_operator import metrics
from forge_operator.api import GROUP, PLURAL, VERSION
from forge_operator.backends import BY_NAME, install_hint
from forge_operator.permissions import api_resource
from forge_operator.status import StatusChange

logger = logging.getLogger(__name__)

# kind -> (API prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "ForgeJob": (f"/apis/{GROUP}/{VERSION}", PLURAL),
    # A stall restart deletes the child job's pods (forge_operator.child_pods).
    "Pod": ("/api/v1", "pods"),
    # The child jobs: PyTorchJob, TrainJob (forge_operator.backends).
    **{backend.kind: (backend.api_path, backend.plural) for backend in BY_NAME.values()},
}
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def namespace_terminating(error: ApiException) -> bool:
    """A 403 because the namespace is being deleted: its objects (the ForgeJob too) are going away."""
    return error.status == 403 and "NamespaceTerminating" in str(error.body or "")


@dataclass(frozen=True)
class Refusal:
    """The cluster said no to something the operator must do: what, why, and what a person can do about it."""

    reason: str
    """MissingAPI, Forbidden or APIUnavailable: the Accepted=Unknown reason."""
    message: str


def _status_body(error: ApiException) -> dict[str, Any] | None:
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("kind") == "Status" else None


def object_missing(error: ApiException) -> bool:
    """A 404 about one object (a Status naming it), not about a whole API that the server does not serve."""
    if error.status != 404:
        return False
    body = _status_body(error)
    return body is not None and bool((body.get("details") or {}).get("name") or (body.get("details") or {}).get("kind"))


VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def describe_request(method: str, path: str) -> str:
    """'create /apis/kubeflow.org/v1/namespaces/team/pytorchjobs': the verb RBAC checks, and the resource path."""
    return f"{VERBS.get(method, method.lower())} {path.split('?', 1)[0]}"


def refusal(error: BaseException) -> Refusal | None:
    """Classify an error of the API server (or of reaching it) that a person must act on; None for the others.

    The message names the refused request (``Kube.request`` records it on the error).
    """
    what = getattr(error, "forge_request", None) or "a request to the API server"
    if isinstance(error, urllib3.exceptions.HTTPError):
        return Refusal("APIUnavailable", f"{what}: the API server cannot be reached ({type(error).__name__}); retrying")
    if not isinstance(error, ApiException):
        return None
    if error.status == 404 and not object_missing(error):
        hint = install_hint(what.split(" ", 1)[-1]) or (
            "Install Forge's CRDs (crds/, or the Helm chart), and the Kubeflow training-operator (its PyTorchJob "
            "CRD, kubeflow.org/v1: `kubectl get crd pytorchjobs.kubeflow.org`)"
        )
        return Refusal("MissingAPI", f"{what}: the API server does not serve this resource. {hint}")
    if error.status == 403 and not namespace_terminating(error):
        detail = (_status_body(error) or {}).get("message") or "forbidden"
        return Refusal(
            "Forbidden",
            f"{what}: {detail}. Grant the operator's ServiceAccount this permission (the Helm chart's rbac.create "
            "renders every rule the operator needs)",
        )
    if error.status in (429, 500, 502, 503, 504) or error.status == 0:
        return Refusal("APIUnavailable", f"{what}: the API server answered {error.status} {error.reason}; retrying")
    return None


class StatusConflictError(RuntimeError):
    """The status kept changing under the operator's feet; the handler should run again later."""


def api_client(pool_size: int = 16) -> client.ApiClient:
    """An API client from the in-cluster service account, or from KUBECONFIG / ~/.kube/config outside a cluster."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    if not configuration.verify_ssl:
        # The kubeconfig asked for no TLS verification (a local control plane); don't warn on every request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return client.ApiClient(configuration)


def controller_of(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ownerReference with controller: true, if any."""
    for reference in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("controller"):
            return dict(reference)
    return None


@dataclass(frozen=True)
class Ensured:
    """The outcome of create-or-adopt for one child."""

    obj: dict[str, Any] | None
    created: bool = False
    conflict: str | None = None


class Kube:
    """Blocking JSON calls through a kubernetes ApiClient (dicts in, dicts out, camelCase as on the wire)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        query: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = {"Accept": JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        what = describe_request(method, path)
        group, resource = api_resource(path)
        metrics.API_REQUESTS.labels(verb=VERBS.get(method, method.lower()), group=group, resource=resource).inc()
        method, url, headers, payload, post = self.api.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        try:
            response = self.api.call_api(method, url, header_params=headers, body=payload, post_params=post)
        except urllib3.exceptions.HTTPError as error:
            error.forge_request = what  # type: ignore[attr-defined]
            raise
        data = response.read()
        if not 200 <= response.status < 300:
            failure = ApiException(http_resp=response.response)
            failure.forge_request = what
            raise failure
        result: dict[str, Any] = json.loads(data) if data else {}
        return result

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix, plural = RESOURCES[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiException as error:
            if object_missing(error):
                return None
            raise

    def list_objects(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The objects of ``kind`` in ``namespace`` matching ``label_selector``."""
        listing = self.request("GET", self.path(kind, namespace), query={"labelSelector": label_selector})
        return list(listing.get("items") or [])

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete one object (only the one with ``uid``, when given); False when it was already gone or replaced."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}} if uid else None
        try:
            self.request("DELETE", self.path(kind, namespace, name), body)
        except ApiException as error:
            if error.status == 404 or (error.status == 409 and uid is not None):
                return False
            raise
        return True

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", self.path(obj["kind"], obj["metadata"]["namespace"]), dict(obj))

    def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        metadata = obj["metadata"]
        return self.request("PUT", self.path(obj["kind"], metadata["namespace"], metadata["name"]), dict(obj))

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        return self.request(
            "PATCH", self.path(kind, namespace, name, subresource), dict(patch), content_type=MERGE_PATCH
        )

    def ensure(self, desired: Mapping[str, Any], owner_uid: str, *, read_first: bool = False) -> Ensured:
        """Create ``desired``, or adopt the existing object of that name when this owner controls it.

        ``read_first`` reads before creating (cheaper when the object most likely exists, e.g. on resume). An
        object of the same name controlled by someone else (or by no one) is left alone and reported as a conflict:
        it may be a previous ForgeJob of the same name that the garbage collector has not removed yet.
        """
        kind = desired["kind"]
        namespace = desired["metadata"]["namespace"]
        name = desired["metadata"]["name"]
        existing = self.get(kind, namespace, name) if read_first else None
        if existing is None:
            try:
                return Ensured(self.create(desired), created=True)
            except ApiException as error:
                if error.status != 409:
                    raise
            existing = self.get(kind, namespace, name)
            if existing is None:
                return Ensured(self.create(desired), created=True)
        return self.adopt(existing, owner_uid)

    @staticmethod
    def adopt(existing: dict[str, Any], owner_uid: str) -> Ensured:
        """Accept an existing child when ``owner_uid`` controls it; report a conflict otherwise."""
        kind = existing.get("kind")
        metadata = existing.get("metadata") or {}
        namespace, name = metadata.get("namespace"), metadata.get("name")
        controller = controller_of(existing)
        if controller is not None and controller.get("uid") == owner_uid:
            return Ensured(existing)
        holder = f"{controller.get('kind')} uid {controller.get('uid')}" if controller else "no controller"
        return Ensured(existing, conflict=f"{kind} {namespace}/{name} already exists and belongs to {holder}")

    def set_finalizer(self, kind: str, namespace: str, name: str, finalizer: str, *, present: bool) -> None:
        """Add or remove one finalizer, keeping the others; a concurrent change is re-read (409), a gone object is
        fine (404)."""
        for _ in range(8):
            obj = self.get(kind, namespace, name)
            if obj is None:
                return
            finalizers = list(obj["metadata"].get("finalizers") or [])
            if (finalizer in finalizers) == present:
                return
            if present and obj["metadata"].get("deletionTimestamp"):
                return  # no new finalizer on an object being deleted
            finalizers = [*finalizers, finalizer] if present else [f for f in finalizers if f != finalizer]
            patch = {"metadata": {"finalizers": finalizers, "resourceVersion": obj["metadata"]["resourceVersion"]}}
            try:
                self.merge_patch(kind, namespace, name, patch)
                return
            except ApiException as error:
                if error.status == 404:
                    return
                if error.status != 409:
                    raise
        raise StatusConflictError(f"finalizers of {kind} {namespace}/{name} kept changing")

    def update_status(
        self,
        namespace: str,
        name: str,
        compute: Callable[[dict[str, Any]], StatusChange],
        retries: int,
    ) -> tuple[dict[str, Any] | None, StatusChange | None]:
        """Read the ForgeJob, compute its status change and write it only if nothing changed in between.

        The merge patch carries the resourceVersion it was computed from, so a concurrent writer (the trainer, the
        other watcher) makes it fail with 409 and the change is recomputed from the fresh object. Returns the
        object as written (or as read when nothing changes) and the change; (None, None) when the ForgeJob is gone.
        """
        for _ in range(retries):
            body = self.get("ForgeJob", namespace, name)
            if body is None:
                return None, None
            change = compute(body)
            if change.empty:
                return body, change
            patch = {**change.patch, "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}}
            try:
                written = self.merge_patch("ForgeJob", namespace, name, patch, subresource="status")
            except ApiException as error:
                if error.status == 409:
                    logger.debug("status of %s/%s changed concurrently; recomputing", namespace, name)
                    continue
                if error.status == 404:
                    return None, None
                raise
            return written, change
        raise StatusConflictError(f"status of {namespace}/{name} kept changing during {retries} attempts")
