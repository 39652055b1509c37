"""The seam between a ForgeJob and the Kubeflow job that runs its trainer: one ``Backend`` per kind of child job.

Everything that knows the child job's kind sits here: its API path, how it is rendered, how its conditions map to
the ForgeJob's condition vocabulary (Created, Running, Restarting, Suspended, Succeeded, Failed), how it is
suspended and what "finished" means. The handlers and ``status`` only see a ``Backend`` and a ``ChildReport``.

- ``pytorchjob``: the Kubeflow training-operator's PyTorchJob (kubeflow.org/v1); conditions are mirrored one to one.
- ``trainjob``: Kubeflow Trainer v2's TrainJob (trainer.kubeflow.org/v1alpha1) on a ClusterTrainingRuntime;
  Complete becomes Succeeded, and Running is read from its child Jobs (status.jobsStatus), which a TrainJob
  reports instead of a Running condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from forge_operator.api import BackendName, ForgeJobSpec
from forge_operator.render import (
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_KIND,
    QUEUE_LABEL,
    TRAINER_GROUP,
    TRAINJOB_API_VERSION,
    TRAINJOB_KIND,
    Owner,
    RenderOptions,
    build_pytorchjob,
    build_trainjob,
)

Reported = Mapping[str, Any]
"""One condition as the child reports it: status, reason, message, lastTransitionTime."""


@dataclass(frozen=True)
class ChildReport:
    """What the operator reads from its child job, in the ForgeJob's vocabulary (the backend's mapping)."""

    kind: str
    name: str
    namespace: str
    conditions: Mapping[str, Reported] = field(default_factory=dict)
    """ForgeJob condition type (Created, Running, Restarting, Suspended, Succeeded, Failed) -> the child's report."""
    suspended: bool = False
    """The child's own suspend field (runPolicy.suspend, spec.suspend)."""
    queue: str | None = None
    """The Kueue LocalQueue of its kueue.x-k8s.io/queue-name label."""


class Backend(Protocol):
    """One kind of child job. Small on purpose: a new operation on the child (e.g. restarting its pods) is one more
    method here and in each implementation."""

    @property
    def name(self) -> BackendName: ...

    @property
    def kind(self) -> str:
        """Kind of the child job, and the key of ``kube.RESOURCES``."""

    @property
    def api_path(self) -> str:
        """The API group/version path, e.g. /apis/kubeflow.org/v1."""

    @property
    def plural(self) -> str: ...

    @property
    def status_field(self) -> str:
        """The ForgeJob status field naming the child (pytorchJob, trainJob)."""

    @property
    def install_hint(self) -> str:
        """What a person installs when the API server does not serve this kind."""

    def build(self, owner: Owner, spec: ForgeJobSpec, options: RenderOptions) -> dict[str, Any]:
        """The child job (pure; its name is the ForgeJob's)."""

    def report(self, child: Mapping[str, Any]) -> ChildReport:
        """The child's state in the ForgeJob's vocabulary."""

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        """The merge-patch ``spec`` that suspends or resumes the child."""

    def finished(self, child: Mapping[str, Any]) -> bool:
        """Whether the child ended (its pods never start again)."""


def _metadata(child: Mapping[str, Any]) -> Mapping[str, Any]:
    return child.get("metadata") or {}


def _conditions(child: Mapping[str, Any]) -> dict[str, Reported]:
    status = child.get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or [] if isinstance(c, dict) and "type" in c}


def _is_true(conditions: Mapping[str, Reported], condition_type: str) -> bool:
    return (conditions.get(condition_type) or {}).get("status") == "True"


@dataclass(frozen=True)
class PyTorchJobBackend:
    """Kubeflow training-operator v1: its conditions already are the ForgeJob's vocabulary."""

    name: BackendName = "pytorchjob"
    kind: str = PYTORCHJOB_KIND
    api_path: str = f"/apis/{PYTORCHJOB_API_VERSION}"
    plural: str = "pytorchjobs"
    status_field: str = "pytorchJob"
    install_hint: str = (
        "Install the Kubeflow training-operator (its PyTorchJob CRD, kubeflow.org/v1: "
        "`kubectl get crd pytorchjobs.kubeflow.org`), or set spec.backend: trainjob where Kubeflow Trainer v2 runs"
    )

    def build(self, owner: Owner, spec: ForgeJobSpec, options: RenderOptions) -> dict[str, Any]:
        return build_pytorchjob(owner, spec, options)

    def report(self, child: Mapping[str, Any]) -> ChildReport:
        metadata = _metadata(child)
        run_policy = (child.get("spec") or {}).get("runPolicy") or {}
        return ChildReport(
            kind=self.kind,
            name=metadata.get("name", ""),
            namespace=metadata.get("namespace", ""),
            conditions=_conditions(child),
            suspended=bool(run_policy.get("suspend", False)),
            queue=(metadata.get("labels") or {}).get(QUEUE_LABEL),
        )

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        return {"runPolicy": {"suspend": suspend}}

    def finished(self, child: Mapping[str, Any]) -> bool:
        conditions = _conditions(child)
        return _is_true(conditions, "Succeeded") or _is_true(conditions, "Failed")


# TrainJob condition type -> ForgeJob condition type (Created is v2.0-v2.2's; v2.3 may omit it).
TRAINJOB_CONDITIONS: Final = {
    "Created": "Created",
    "Suspended": "Suspended",
    "Complete": "Succeeded",
    "Failed": "Failed",
}
REASON_JOBS_READY = "JobsReady"


@dataclass(frozen=True)
class TrainJobBackend:
    """Kubeflow Trainer v2: Created, Suspended, Complete and Failed conditions; Running from its child Jobs."""

    name: BackendName = "trainjob"
    kind: str = TRAINJOB_KIND
    api_path: str = f"/apis/{TRAINJOB_API_VERSION}"
    plural: str = "trainjobs"
    status_field: str = "trainJob"
    install_hint: str = (
        "Install Kubeflow Trainer v2 (its TrainJob CRD, trainer.kubeflow.org/v1alpha1: "
        "`kubectl get crd trainjobs.trainer.kubeflow.org`, and the ClusterTrainingRuntime the ForgeJob uses, "
        "torch-distributed by default), or set spec.backend: pytorchjob where the training-operator runs"
    )

    def build(self, owner: Owner, spec: ForgeJobSpec, options: RenderOptions) -> dict[str, Any]:
        return build_trainjob(owner, spec, options)

    def report(self, child: Mapping[str, Any]) -> ChildReport:
        metadata = _metadata(child)
        name = metadata.get("name", "")
        reported = _conditions(child)
        conditions: dict[str, Reported] = {
            ours: reported[theirs] for theirs, ours in TRAINJOB_CONDITIONS.items() if theirs in reported
        }
        suspended = bool((child.get("spec") or {}).get("suspend", False))
        finished = _is_true(reported, "Complete") or _is_true(reported, "Failed")
        jobs = [j for j in (child.get("status") or {}).get("jobsStatus") or [] if isinstance(j, dict)]
        ready = sum(int(j.get("ready") or 0) for j in jobs)
        # Running is reported only while it is True: when it goes (suspended, finished) the mirror turns it False,
        # and a run suspended before it ever ran never had it (Kueue's hold is then WaitingForAdmission).
        if ready and not finished and not suspended and not _is_true(reported, "Suspended"):
            conditions["Running"] = {
                "status": "True",
                "reason": REASON_JOBS_READY,
                "message": f"TrainJob {name}: {ready} of {len(jobs)} Job(s) ready",
            }
        return ChildReport(
            kind=self.kind,
            name=name,
            namespace=metadata.get("namespace", ""),
            conditions=conditions,
            suspended=suspended,
            queue=(metadata.get("labels") or {}).get(QUEUE_LABEL),
        )

    def suspend_patch(self, suspend: bool) -> dict[str, Any]:
        return {"suspend": suspend}

    def finished(self, child: Mapping[str, Any]) -> bool:
        conditions = _conditions(child)
        return _is_true(conditions, "Complete") or _is_true(conditions, "Failed")


PYTORCHJOB: Final = PyTorchJobBackend()
TRAINJOB: Final = TrainJobBackend()
BY_NAME: Final[dict[BackendName, Backend]] = {"pytorchjob": PYTORCHJOB, "trainjob": TRAINJOB}
BY_KIND: Final[dict[str, Backend]] = {backend.kind: backend for backend in BY_NAME.values()}
GROUPS: Final[dict[str, Backend]] = {"kubeflow.org": PYTORCHJOB, TRAINER_GROUP: TRAINJOB}


def chosen(spec: ForgeJobSpec, default: BackendName) -> Backend:
    """The backend a ForgeJob asks for (spec.backend), else the operator's default."""
    return BY_NAME[spec.backend or default]


def install_hint(path: str) -> str | None:
    """What to install when the API server does not serve ``path`` (a request path), if it is a child job's."""
    parts = [part for part in path.split("?", 1)[0].split("/") if part]
    if parts[:1] == ["apis"] and len(parts) > 1 and parts[1] in GROUPS:
        return GROUPS[parts[1]].install_hint
    return None
