"""The environment of a replica's process: what kubelet and Kubeflow's training-operator would give the container.

Pure functions. Order, as on a cluster: the stand-in's own environment (PATH with the venv's bin first, minus
in-cluster and distributed-training variables), then the container's ``envFrom`` and ``env`` (``valueFrom``
resolved, ``$(VAR)`` expanded as kubelet does), then the variables Kubeflow appends (they win over the template's).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from forge_dev.standin.references import ObjectSource, ReplicaStartError, lookup
from forge_dev.standin.spec import Container, EnvVar, KeySelector

MASTER_ADDR = "127.0.0.1"
POD_IP = "127.0.0.1"

# Never inherited from the stand-in's own environment: in-cluster API discovery (processes get a kubeconfig
# instead) and anything torch.distributed / torchrun would read (the stand-in sets its own values).
_DROPPED_PREFIXES = ("KUBERNETES_SERVICE_", "KUBERNETES_PORT", "PET_", "TORCHELASTIC_")
_DROPPED_NAMES = frozenset(
    {
        "KUBECONFIG",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "NODE_RANK",
    }
)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_LABEL_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


@dataclass(frozen=True)
class PodFields:
    """What a fieldRef can read about the (virtual) pod of a replica."""

    name: str
    namespace: str
    uid: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    node_name: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class Rendezvous:
    """Where and how one process joins the job: the values Kubeflow (and torchrun, for local ranks) inject."""

    master_port: int
    world_size: int
    nnodes: int
    node_rank: int
    nproc_per_node: int
    local_rank: int

    @property
    def rank(self) -> int:
        return self.node_rank * self.nproc_per_node + self.local_rank


def base_environment(inherited: Mapping[str, str], path_prefix: Iterable[str] = ()) -> dict[str, str]:
    """The stand-in's environment for a child: in-cluster and distributed variables removed, PATH prefixed."""
    env = {
        name: value
        for name, value in inherited.items()
        if name not in _DROPPED_NAMES and not name.startswith(_DROPPED_PREFIXES)
    }
    path = [entry for entry in env.get("PATH", "").split(":") if entry]
    prefix = [entry for entry in path_prefix if entry]
    env["PATH"] = ":".join([*prefix, *(entry for entry in path if entry not in prefix)])
    return env


def kubeflow_environment(rendezvous: Rendezvous) -> list[tuple[str, str]]:
    """The variables Kubeflow's training-operator appends to the ``pytorch`` container, adapted to one machine.

    MASTER_ADDR is loopback instead of the master's Service; with local ranks (nprocPerNode > 1) each process
    also gets what torchrun would set (global RANK, LOCAL_RANK, LOCAL_WORLD_SIZE).
    """
    port = str(rendezvous.master_port)
    return [
        ("PYTHONUNBUFFERED", "1"),
        ("MASTER_PORT", port),
        ("MASTER_ADDR", MASTER_ADDR),
        ("PET_MASTER_PORT", port),
        ("PET_MASTER_ADDR", MASTER_ADDR),
        ("WORLD_SIZE", str(rendezvous.world_size)),
        ("RANK", str(rendezvous.rank)),
        ("PET_NNODES", str(rendezvous.nnodes)),
        ("PET_NODE_RANK", str(rendezvous.node_rank)),
        ("PET_NPROC_PER_NODE", str(rendezvous.nproc_per_node)),
        ("LOCAL_RANK", str(rendezvous.local_rank)),
        ("LOCAL_WORLD_SIZE", str(rendezvous.nproc_per_node)),
    ]


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (command, args, env values).

    ``$(NAME)`` becomes the variable's value when it is defined and stays as written otherwise; ``$$`` is an
    escaped ``$``; any other ``$`` is kept.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 >= len(text):
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : end]
                out.append(variables.get(name, f"$({name})"))
                i = end + 1
        else:
            out.append("$" + following)
            i += 2
    return "".join(out)


def field_ref_value(field_path: str, pod: PodFields) -> str:
    """The value of a downward-API fieldRef for the replica's virtual pod."""
    simple = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "spec.serviceAccountName": pod.service_account,
        "spec.nodeName": pod.node_name,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if field_path in simple:
        return simple[field_path]
    match = _LABEL_FIELD.match(field_path)
    if match:
        source = pod.labels if match.group(1) == "labels" else pod.annotations
        return source.get(match.group(2), "")
    raise ReplicaStartError(f"fieldRef {field_path!r} is not supported by the stand-in")


def _key_value(source: ObjectSource, kind: str, ref: KeySelector) -> str | None:
    data = lookup(source, kind, ref.name)
    if data is None:
        if ref.optional:
            return None
        raise ReplicaStartError(f'{kind} "{ref.name}" not found')
    if ref.key not in data:
        if ref.optional:
            return None
        raise ReplicaStartError(f'couldn\'t find key {ref.key} in {kind} "{ref.name}"')
    return data[ref.key].decode(errors="replace")


def _env_var_value(var: EnvVar, defined: Mapping[str, str], source: ObjectSource, pod: PodFields) -> str | None:
    if var.value_from is None:
        return expand(var.value or "", defined)
    ref = var.value_from
    if ref.config_map_key_ref is not None:
        return _key_value(source, "configmap", ref.config_map_key_ref)
    if ref.secret_key_ref is not None:
        return _key_value(source, "secret", ref.secret_key_ref)
    if ref.field_ref is not None:
        return field_ref_value(ref.field_ref.field_path, pod)
    raise ReplicaStartError(f"env {var.name}: this kind of valueFrom is not supported by the stand-in")


def container_environment(container: Container, source: ObjectSource, pod: PodFields) -> dict[str, str]:
    """The container's own variables, in kubelet's order: envFrom, then env (later definitions win).

    Raises ReplicaStartError when a non-optional reference cannot be resolved.
    """
    env: dict[str, str] = {}
    for entry in container.env_from:
        kind, ref = ("configmap", entry.config_map_ref) if entry.config_map_ref else ("secret", entry.secret_ref)
        if ref is None:
            continue
        data = lookup(source, kind, ref.name)
        if data is None:
            if ref.optional:
                continue
            raise ReplicaStartError(f'{kind} "{ref.name}" not found')
        for key, raw in data.items():
            name = entry.prefix + key
            if _ENV_NAME.match(name):
                env[name] = raw.decode(errors="replace")
    for var in container.env:
        value = _env_var_value(var, env, source, pod)
        if value is not None:
            env[var.name] = value
    return env


def process_environment(
    base: Mapping[str, str],
    container_env: Mapping[str, str],
    injected: Iterable[tuple[str, str]],
    rewrite: Callable[[str], str],
    kubeconfig: str,
) -> dict[str, str]:
    """The final environment: base, then the container's variables (mount paths rewritten), then Kubeflow's."""
    env = dict(base)
    env.update({name: rewrite(value) for name, value in container_env.items()})
    env.update(dict(injected))
    env["KUBECONFIG"] = kubeconfig
    return env


def command_line(container: Container, variables: Mapping[str, str], rewrite: Callable[[str], str]) -> list[str]:
    """The container's command + args, ``$(VAR)`` expanded against the container's variables, paths rewritten."""
    argv = [*container.command, *container.args]
    if not container.command:
        raise ReplicaStartError(
            "the pytorch container has no command: the stand-in cannot run an image's entrypoint, "
            "so the template must spell the command out"
        )
    return [rewrite(expand(arg, variables)) for arg in argv]


# The Forge trainer stages checkpoints in checkpoints.localDir: /tmp/forge/checkpoints, inside the pod's scratch
# emptyDir. Every replica here shares one file system and file contents (the trainer's config) are never rewritten,
# so the stand-in passes the replica's own folder in the variable the trainer reads to override that path: two
# replicas (of one job, or of two jobs) never stage a checkpoint in the same folder.
CHECKPOINT_DIR_IN_POD = "/tmp/forge/checkpoints"
CHECKPOINT_DIR_ENV = "FORGE_CHECKPOINT_LOCAL_DIR"
CHECKPOINT_FALLBACK = "scratch-checkpoints"  # under the replica's folder when /tmp/forge is not mounted


def checkpoint_dir_environment(
    container_env: Mapping[str, str], rewrite: Callable[[str], str], replica_dir: str
) -> dict[str, str]:
    """``FORGE_CHECKPOINT_LOCAL_DIR`` for one replica: the mapped scratch mount, else a folder of the replica's own;
    nothing when the container sets the variable itself."""
    if CHECKPOINT_DIR_ENV in container_env:
        return {}
    mapped = rewrite(CHECKPOINT_DIR_IN_POD)
    if mapped == CHECKPOINT_DIR_IN_POD:
        mapped = f"{replica_dir.rstrip('/')}/{CHECKPOINT_FALLBACK}"
    return {CHECKPOINT_DIR_ENV: mapped}
