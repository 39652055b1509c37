"""Kubeconfig files for the local control plane: the admin's and each replica's ServiceAccount's."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach the API server: its URL and how to trust it."""

    server: str
    ca_pem: bytes | None = None
    insecure: bool = False

    @classmethod
    def from_api_client(cls, api_client: client.ApiClient) -> ClusterAccess:
        configuration = api_client.configuration
        ca_file = configuration.ssl_ca_cert
        ca_pem = Path(ca_file).read_bytes() if ca_file else None
        return cls(server=str(configuration.host), ca_pem=ca_pem, insecure=not configuration.verify_ssl)


def kubeconfig_text(access: ClusterAccess, token: str, namespace: str, user: str) -> str:
    """A kubeconfig for one server, one bearer token and a default namespace."""
    cluster: dict[str, object] = {"server": access.server}
    if access.ca_pem is not None and not access.insecure:
        cluster["certificate-authority-data"] = base64.b64encode(access.ca_pem).decode()
    else:
        cluster["insecure-skip-tls-verify"] = True
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "forge-local", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "forge-local", "context": {"cluster": "forge-local", "user": user, "namespace": namespace}}
        ],
        "current-context": "forge-local",
    }
    return yaml.safe_dump(document, sort_keys=False)


def write_kubeconfig(path: Path, text: str) -> None:
    """Write a kubeconfig readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
