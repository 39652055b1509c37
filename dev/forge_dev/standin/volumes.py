"""Volumes of a replica as local folders, and the rule that maps container mount paths to them.

Each ``volumeMount`` of the ``pytorch`` container becomes a local path:

==========================  ===========================================================================
volume                      local path
==========================  ===========================================================================
configMap, secret,          ``<replica dir>/volumes/<volume>``, written afresh at every (re)start: one file
projected (of those)        per key, or the ``items`` (key -> path, mode), like kubelet
emptyDir                    ``<replica dir>/volumes/<volume>``, emptied when the job's replica first starts,
                            kept across restarts (a pod's emptyDir outlives container restarts)
hostPath                    the host path itself (this machine is the node)
persistentVolumeClaim       ``<workdir>/<namespace>/pvc/<claimName>``, shared by every job of the namespace
==========================  ===========================================================================

With ``subPath`` the mount's local path is ``<volume's local path>/<subPath>``.

Mount paths then reach the process through one textual rule (:class:`PathRewriter`): every occurrence of a
mount path, as a whole path prefix, in the command, the args and the container's env values is replaced by its
local path (the longest mount path first, in a single pass). File contents are never rewritten.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from forge_dev.standin.references import ObjectSource, ReplicaStartError, lookup
from forge_dev.standin.spec import Container, KeyToPath, PodSpec, Volume

_PATH_CHAR = r"[A-Za-z0-9._~+@-]"
DEFAULT_FILE_MODE = 0o644


@dataclass(frozen=True)
class MountMapping:
    """A container mount path and the local path standing in for it."""

    mount_path: str
    local_path: Path


def normalise_mount_path(mount_path: str) -> str:
    if not mount_path.startswith("/"):
        raise ReplicaStartError(f"mountPath {mount_path!r} must be absolute")
    normalised = posixpath.normpath(mount_path)
    return "/" if normalised == "/" else normalised.rstrip("/")


class PathRewriter:
    """Rewrites mount paths in a string to their local paths (see the module docstring for the rule).

    A mount path matches only as a whole path prefix: ``/data`` matches ``/data``, ``/data/x`` and
    ``--out=/data/x`` but not ``/database`` or ``/srv/data``.
    """

    def __init__(self, mappings: Iterable[MountMapping]) -> None:
        self._targets: dict[str, str] = {}
        for mapping in mappings:
            if mapping.mount_path != "/":
                self._targets.setdefault(mapping.mount_path, str(mapping.local_path))
        ordered = sorted(self._targets, key=len, reverse=True)
        self._pattern = (
            re.compile(rf"(?<!{_PATH_CHAR})(?<!/)(?:{'|'.join(re.escape(path) for path in ordered)})(?!{_PATH_CHAR})")
            if ordered
            else None
        )

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: self._targets[match.group(0)], text)

    @property
    def mappings(self) -> dict[str, str]:
        return dict(self._targets)


def key_files(data: dict[str, bytes], items: Sequence[KeyToPath], optional: bool, what: str) -> dict[str, bytes]:
    """The files (relative path -> content) a configMap/secret volume holds: every key, or the listed items."""
    if not items:
        return dict(data)
    files: dict[str, bytes] = {}
    for item in items:
        if item.key not in data:
            if optional:
                continue
            raise ReplicaStartError(f"{what} references non-existent key: {item.key}")
        files[item.path] = data[item.key]
    return files


def item_modes(items: Sequence[KeyToPath]) -> dict[str, int]:
    return {item.path: item.mode for item in items if item.mode is not None}


def _safe_relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ReplicaStartError(f"volume path {path!r} must be relative and must not contain '..'")
    return relative


def _write_files(root: Path, files: dict[str, bytes], modes: dict[str, int], default_mode: int | None) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for relative, content in files.items():
        target = root.joinpath(*_safe_relative(relative).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.chmod(target, modes.get(relative, default_mode if default_mode is not None else DEFAULT_FILE_MODE))


def _source_files(
    source: ObjectSource, kind: str, name: str, items: Sequence[KeyToPath], optional: bool
) -> dict[str, bytes]:
    data = lookup(source, kind, name)
    if data is None:
        if optional:
            return {}
        raise ReplicaStartError(f'{kind} "{name}" not found')
    return key_files(data, items, optional, f'{kind} "{name}"')


def volume_files(volume: Volume, source: ObjectSource) -> tuple[dict[str, bytes], dict[str, int]]:
    """Files and per-file modes of a configMap, secret or projected volume."""
    if volume.config_map is not None:
        cm = volume.config_map
        return _source_files(source, "configmap", cm.name, cm.items, cm.optional), item_modes(cm.items)
    if volume.secret is not None:
        secret = volume.secret
        files = _source_files(source, "secret", secret.secret_name, secret.items, secret.optional)
        return files, item_modes(secret.items)
    if volume.projected is not None:
        files, modes = {}, {}
        for projection in volume.projected.sources:
            kind, ref = ("configmap", projection.config_map) if projection.config_map else ("secret", projection.secret)
            if ref is None:
                raise ReplicaStartError(f"volume {volume.name}: only configMap and secret projections are supported")
            files.update(_source_files(source, kind, ref.name, ref.items, ref.optional))
            modes.update(item_modes(ref.items))
        return files, modes
    raise ReplicaStartError(
        f"volume {volume.name}: its type is not supported by the stand-in "
        "(configMap, secret, projected, emptyDir, hostPath and persistentVolumeClaim are)"
    )


def _default_mode(volume: Volume) -> int | None:
    for holder in (volume.config_map, volume.secret, volume.projected):
        if holder is not None:
            return holder.default_mode
    return None


@dataclass(frozen=True)
class VolumeLayout:
    """Where a replica's volumes live on this machine."""

    replica_dir: Path
    claims_dir: Path

    def volume_dir(self, name: str) -> Path:
        return self.replica_dir / "volumes" / name


def materialise_volume(volume: Volume, layout: VolumeLayout, source: ObjectSource, fresh: bool) -> Path:
    """Create the local folder of one volume and return it. ``fresh``: the replica's first start in this job."""
    if volume.host_path is not None:
        return Path(volume.host_path.path)
    if volume.persistent_volume_claim is not None:
        claim = layout.claims_dir / volume.persistent_volume_claim.claim_name
        claim.mkdir(parents=True, exist_ok=True)
        return claim
    local = layout.volume_dir(volume.name)
    if volume.empty_dir is not None:
        if fresh and local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True, exist_ok=True)
        return local
    files, modes = volume_files(volume, source)
    _write_files(local, files, modes, _default_mode(volume))
    return local


def materialise_mounts(
    pod: PodSpec, container: Container, layout: VolumeLayout, source: ObjectSource, fresh: bool
) -> list[MountMapping]:
    """Materialise every volume the container mounts; return the mount path -> local path mappings."""
    volumes = {volume.name: volume for volume in pod.volumes}
    local_roots: dict[str, Path] = {}
    mappings: list[MountMapping] = []
    for mount in container.volume_mounts:
        volume = volumes.get(mount.name)
        if volume is None:
            raise ReplicaStartError(f"volumeMount {mount.name!r} names no volume of the pod template")
        if mount.name not in local_roots:
            local_roots[mount.name] = materialise_volume(volume, layout, source, fresh)
        local = local_roots[mount.name]
        if mount.sub_path:
            local = local.joinpath(*_safe_relative(mount.sub_path).parts)
            if not local.exists():  # kubelet creates a missing subPath as a directory
                local.mkdir(parents=True)
        mappings.append(MountMapping(normalise_mount_path(mount.mount_path), local))
    return mappings
