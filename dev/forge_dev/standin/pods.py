"""Pod objects for the replicas the stand-in runs, so that pods can be listed and deleted as in a cluster.

Each start of a replica creates a Pod named as Kubeflow names it (``<job>-master-0``, ``<job>-worker-<i>``) with
Kubeflow's labels and an ownerReference to the PyTorchJob (the garbage collector removes it with the job). The Pod is
a handle only: its spec is minimal and nothing schedules or runs it (it stays Pending); the processes are the
replica. Deleting the Pod is how a controller (Forge's stall restart) restarts a replica: the stand-in stops the
replica's processes and starts them again with a new Pod, as the training operator re-creates a deleted pod. Such a
restart does not count against ``backoffLimit``.
"""

from __future__ import annotations

from typing import Any

from forge_dev.standin.spec import GROUP, VERSION, PyTorchJob

PLACEHOLDER_IMAGE = "forge-standin/local-process"


def pod_manifest(
    job: PyTorchJob, pod_name: str, labels: dict[str, str], container: str, image: str | None, account: str
) -> dict[str, Any]:
    """The Pod object standing for one replica attempt."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": job.metadata.namespace,
            "labels": labels,
            "annotations": {
                "forge.dev/standin": "the replica runs as local processes of the training-operator stand-in"
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "PyTorchJob",
                    "name": job.metadata.name,
                    "uid": job.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [{"name": container, "image": image or PLACEHOLDER_IMAGE}],
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
        },
    }


def pod_gone(listed: dict[tuple[str, str], tuple[str, bool]], namespace: str, name: str, uid: str) -> bool:
    """Whether the pod with ``uid`` is gone or being deleted, from a listing {(namespace, name): (uid, deleting)}."""
    found = listed.get((namespace, name))
    return found is None or found[0] != uid or found[1]
