"""ConfigMaps and Secrets that a pod template refers to (env valueFrom/envFrom and volumes)."""

from __future__ import annotations

import base64
from typing import Protocol

from kubernetes import client
from kubernetes.client.rest import ApiException


class ReplicaStartError(RuntimeError):
    """A replica cannot be started yet (a missing ConfigMap, Secret, key or ServiceAccount, ...).

    Kubernetes keeps such a pod waiting (CreateContainerConfigError) and retries; so does the stand-in.
    """


class ObjectSource(Protocol):
    """Reads ConfigMaps and Secrets of one namespace; ``None`` when the object does not exist."""

    def config_map(self, name: str) -> dict[str, bytes] | None: ...

    def secret(self, name: str) -> dict[str, bytes] | None: ...


class ApiObjectSource:
    """An :class:`ObjectSource` backed by the API server, caching each object for its own lifetime."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self._core = core
        self._namespace = namespace
        self._config_maps: dict[str, dict[str, bytes] | None] = {}
        self._secrets: dict[str, dict[str, bytes] | None] = {}

    def config_map(self, name: str) -> dict[str, bytes] | None:
        if name not in self._config_maps:
            self._config_maps[name] = self._read_config_map(name)
        return self._config_maps[name]

    def secret(self, name: str) -> dict[str, bytes] | None:
        if name not in self._secrets:
            self._secrets[name] = self._read_secret(name)
        return self._secrets[name]

    def _read_config_map(self, name: str) -> dict[str, bytes] | None:
        try:
            obj = self._core.read_namespaced_config_map(name, self._namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        data: dict[str, bytes] = {key: value.encode() for key, value in (obj.data or {}).items()}
        data.update({key: base64.b64decode(value) for key, value in (obj.binary_data or {}).items()})
        return data

    def _read_secret(self, name: str) -> dict[str, bytes] | None:
        try:
            obj = self._core.read_namespaced_secret(name, self._namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return {key: base64.b64decode(value) for key, value in (obj.data or {}).items()}


class StaticObjectSource:
    """An :class:`ObjectSource` over fixed data (for tests and dry runs)."""

    def __init__(
        self,
        config_maps: dict[str, dict[str, bytes]] | None = None,
        secrets: dict[str, dict[str, bytes]] | None = None,
    ) -> None:
        self._config_maps = config_maps or {}
        self._secrets = secrets or {}

    def config_map(self, name: str) -> dict[str, bytes] | None:
        return self._config_maps.get(name)

    def secret(self, name: str) -> dict[str, bytes] | None:
        return self._secrets.get(name)


def lookup(source: ObjectSource, kind: str, name: str) -> dict[str, bytes] | None:
    """``kind`` is ``configmap`` or ``secret`` (kubelet's words in its error messages)."""
    return source.config_map(name) if kind == "configmap" else source.secret(name)
