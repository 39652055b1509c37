"""A replica's API credentials: a ServiceAccount token from the TokenRequest API, in a kubeconfig.

This is what kubelet's projected service-account token gives a pod, delivered as a kubeconfig because the
processes run outside any cluster network (no in-cluster environment variables are set).
"""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException

from forge_dev.standin.references import ReplicaStartError


def request_token(core: client.CoreV1Api, namespace: str, service_account: str, expiration_s: int) -> str:
    """A bound token for ``service_account`` from the TokenRequest API (the API server's default audiences)."""
    body = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_s)
    )
    try:
        response = core.create_namespaced_service_account_token(service_account, namespace, body)
    except ApiException as error:
        if error.status == 404:
            raise ReplicaStartError(f'serviceaccount "{service_account}" not found') from error
        raise
    return str(response.status.token)
