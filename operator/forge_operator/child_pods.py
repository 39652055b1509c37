"""The pods of a ForgeJob's child job, by the child's kind: the one place the liveness handler learns how a backend
labels its pods, restarts them and is stopped.

PyTorchJob (Kubeflow training-operator v1): pods carry ``training.kubeflow.org/job-name=<name>``; the training
operator re-creates a deleted pod, so deleting the pods restarts every rank (which resumes from the latest complete
checkpoint). TrainJob (Kubeflow Trainer v2) runs a JobSet whose pods carry ``jobset.sigs.k8s.io/jobset-name=<name>``;
each pod's Job re-creates it, and the deletion counts against that Job's backoffLimit (the runtime's). The local
stand-in models PyTorchJob pods only, so the TrainJob restart is not exercised by the local tests.
"""

from __future__ import annotations

from forge_operator.api import PodRef
from forge_operator.kube import Kube

POD_NAME_LABELS: dict[str, str] = {
    "PyTorchJob": "training.kubeflow.org/job-name",
    "TrainJob": "jobset.sigs.k8s.io/jobset-name",
}
# The child kinds whose pods the operator may restart and which it may stop (implemented backends).
RESTARTABLE_KINDS = frozenset({"PyTorchJob", "TrainJob"})


class UnsupportedChildError(ValueError):
    """A child kind this operator cannot restart or stop."""


def pod_selector(kind: str, name: str) -> str:
    """The label selector of the child job's pods: 'training.kubeflow.org/job-name=<name>' for a PyTorchJob."""
    label = POD_NAME_LABELS.get(kind)
    if label is None:
        raise UnsupportedChildError(f"no pod label known for child kind {kind}")
    return f"{label}={name}"


def lead_pod(kind: str, name: str) -> str:
    """The pod of rank 0 (its log has the trainer's events)."""
    return f"{name}-master-0" if kind == "PyTorchJob" else f"{name}-node-0-0"


def child_pods(kube: Kube, kind: str, namespace: str, name: str) -> list[PodRef]:
    """The child job's pods now (those being deleted left out), sorted by name."""
    pods = []
    for pod in kube.list_objects("Pod", namespace, pod_selector(kind, name)):
        metadata = pod.get("metadata") or {}
        if not metadata.get("deletionTimestamp"):
            pods.append(PodRef(name=metadata["name"], uid=metadata["uid"]))
    return sorted(pods, key=lambda pod: pod.name)


def restart_pods(kube: Kube, kind: str, namespace: str, pods: list[PodRef]) -> int:
    """Delete these pods of the child job (each only if it still has its uid): the child's controller re-creates
    them. Returns how many were deleted now (0 when an earlier attempt already did it)."""
    if kind not in RESTARTABLE_KINDS:
        raise UnsupportedChildError(f"restarting the pods of a {kind} is not implemented")
    return sum(kube.delete("Pod", namespace, pod.name, uid=pod.uid) for pod in pods)


def stop_child(kube: Kube, kind: str, namespace: str, name: str) -> bool:
    """Stop the child job for good: delete it (its pods go with it); False when it was already gone."""
    if kind not in RESTARTABLE_KINDS:
        raise UnsupportedChildError(f"stopping a {kind} is not implemented")
    return kube.delete(kind, namespace, name)
