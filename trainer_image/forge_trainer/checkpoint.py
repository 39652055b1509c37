"""Checkpoints: DeepSpeed save to node-local disk, upload, manifest last, resume, export, prune.

Layout, locally (``checkpoints.localDir``) and in ``checkpoints.output`` alike::

    step-00000200/
      global_step200/...          DeepSpeed files (module, optimizer shards, scheduler)
      forge/state.json            trainer state: step, tokens, data-stream state, baseline, reports
      forge/rng_rank_<r>.pt       RNG state of rank r (dropout)
      hf/                         Hugging Face safetensors export (checkpoints.exportHf)
      forge-manifest.json         written LAST: the list of files (with sizes) and the checkpoint's metrics

A checkpoint is complete only when its manifest exists; without one it is never resumed from nor reported.
Each rank uploads the files it wrote (its ZeRO shards and RNG file; rank 0 everything else) so that ranks on
different nodes with separate local disks together upload the whole checkpoint. The uploads run in a background
thread while training goes on; once every rank has confirmed its files, rank 0 writes the manifest. A resume
downloads only what the local rank needs: its own shards and RNG file, and the shared files (not the hf/ export).
A storage read error is never taken for a missing manifest: it is retried, then raised.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from forge_trainer import storage
from forge_trainer.errors import ConfigError, StorageError, StorageUnavailableError
from forge_trainer.model import file_lock

if TYPE_CHECKING:
    from forge_trainer.hf_export import LazyTensor

log = logging.getLogger(__name__)

MANIFEST = "forge-manifest.json"
HF_DIR = "hf"
STATE_FILE = "forge/state.json"
MANIFEST_VERSION = 1
_TAG_RE = re.compile(r"^step-(\d{8})$")
_OWNER_RE = re.compile(r"(?:zero_pp_rank_|rng_rank_)(\d+)(?:_|\.)")
_SAVE_MARK = ".forge-save-id"


def tag_for(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def step_of(tag: str) -> int | None:
    """Inverse of tag_for; None for other names."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def owner_rank(relpath: str) -> int:
    """The rank that writes and uploads a checkpoint file."""
    m = _OWNER_RE.search(relpath.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else 0


def _is_internal(relpath: str) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return name == MANIFEST or name.startswith(".") or relpath == "latest"


def owned_files(tag_dir: Path, rank: int) -> list[tuple[str, int]]:
    """(relative path, size) of the files under a local checkpoint folder that ``rank`` uploads."""
    out = []
    for p in sorted(tag_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(tag_dir).as_posix()
        if not _is_internal(rel) and owner_rank(rel) == rank:
            out.append((rel, p.stat().st_size))
    return out


def make_manifest(
    step: int, files: list[tuple[str, int]], metrics: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """The manifest document."""
    return {
        "version": MANIFEST_VERSION,
        "step": step,
        "tag": tag_for(step),
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"path": p, "size": s} for p, s in sorted(files)],
        "metrics": metrics,
        **meta,
    }


def read_json_object(uri: str, what: str) -> dict[str, Any] | None:
    """The JSON object stored at ``uri``; None when it does not exist, or is corrupt or not an object (logged).

    A read error is not absence: storage faults are retried and then raised (StorageUnavailableError).
    """
    raw = storage.read_bytes(uri)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("ignoring %s: not valid JSON", what)
        return None
    return doc if isinstance(doc, dict) else None


def read_manifest(uri: str) -> dict[str, Any] | None:
    """A checkpoint's manifest, or None when it is missing or unreadable (an incomplete checkpoint)."""
    doc = read_json_object(storage.join(uri, MANIFEST), f"the manifest of {uri}")
    return doc if doc is not None and doc.get("version") == MANIFEST_VERSION else None


def list_tags(location: str) -> list[str]:
    """Checkpoint folder names directly under a local folder or S3 prefix, oldest first."""
    return [t for t in storage.list_folders(location) if step_of(t) is not None]


def complete_checkpoints(output: str) -> list[dict[str, Any]]:
    """Manifests of the complete checkpoints in ``output``, oldest first."""
    out = []
    for tag in list_tags(output):
        manifest = read_manifest(storage.join(output, tag))
        if manifest is not None and manifest.get("tag") == tag:
            out.append(manifest)
        else:
            log.info("ignoring incomplete checkpoint %s", storage.join(output, tag))
    return out


def latest_complete(output: str) -> dict[str, Any] | None:
    """The newest complete checkpoint's manifest."""
    found = complete_checkpoints(output)
    return found[-1] if found else None


def is_resumable(manifest: dict[str, Any]) -> bool:
    """False for a checkpoint whose training state the output retention dropped (only its hf/ export is left)."""
    return manifest.get("resumable") is not False


def latest_resumable(output: str) -> dict[str, Any] | None:
    """The newest complete checkpoint that still holds its training state (a run resumes from it)."""
    found = [m for m in complete_checkpoints(output) if is_resumable(m)]
    return found[-1] if found else None


@dataclass(frozen=True)
class Places:
    """Where checkpoints go: node-local folder and durable output."""

    local_dir: Path
    output: str

    def local(self, step: int) -> Path:
        """Local folder of a checkpoint."""
        return self.local_dir / tag_for(step)

    def remote(self, step: int) -> str:
        """Output URI of a checkpoint."""
        return storage.join(self.output, tag_for(step))

    @property
    def lock(self) -> Path:
        """Lock file for the ranks sharing ``local_dir``."""
        return self.local_dir / ".forge.lock"


def new_save_id() -> str:
    """A fresh id for one save (rank 0 draws it, every rank gets it by broadcast)."""
    return uuid.uuid4().hex


def prepare_local(places: Places, step: int, save_id: str) -> None:
    """Clear leftovers of an earlier crashed save of the same step, once per node (the first rank to come)."""
    tag_dir = places.local(step)
    with file_lock(places.lock):
        mark = tag_dir / _SAVE_MARK
        if mark.is_file() and mark.read_text() == save_id:
            return
        if tag_dir.exists():
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True)
        mark.write_text(save_id)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))


def save_rng(tag_dir: Path, rank: int) -> None:
    """This rank's RNG states (for dropout; bit-exact resume)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    path = tag_dir / "forge" / f"rng_rank_{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng(tag_dir: Path, rank: int) -> None:
    """Restore this rank's RNG states if the checkpoint has them (same world size)."""
    path = tag_dir / "forge" / f"rng_rank_{rank}.pt"
    if not path.is_file():
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def upload_owned(places: Places, step: int, rank: int) -> list[tuple[str, int]]:
    """Upload the files this rank owns; returns them for the manifest."""
    tag_dir = places.local(step)
    files = owned_files(tag_dir, rank)
    if storage.same_place(str(places.local_dir), places.output):
        return files
    for rel, _ in files:
        storage.upload(tag_dir / rel, storage.join(places.remote(step), rel))
    return files


class BackgroundUpload:
    """One rank's upload of its files of one checkpoint, in a thread, while training goes on."""

    def __init__(self, places: Places, step: int, rank: int) -> None:
        self.step = step
        self.files: list[tuple[str, int]] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._thread = threading.Thread(
            target=self._run, args=(places, rank), name=f"forge-upload-{tag_for(step)}", daemon=True
        )
        self._thread.start()

    def _run(self, places: Places, rank: int) -> None:
        try:
            self.files = upload_owned(places, self.step, rank)
        except BaseException as err:  # handed to every rank by the next poll; the thread must not die silently
            self.error = err
        finally:
            self.seconds = time.monotonic() - self.started

    @property
    def running(self) -> bool:
        """True while the upload is under way."""
        return self._thread.is_alive()

    def wait(self) -> None:
        """Block until the upload has finished or failed."""
        self._thread.join()


def write_local_manifest(places: Places, step: int, manifest: dict[str, Any]) -> None:
    """The manifest in the local copy (atomic)."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    storage.write_bytes(str(places.local(step) / MANIFEST), data)


def publish_manifest(places: Places, step: int, manifest: dict[str, Any]) -> None:
    """Write the manifest locally, then to the output: the output's manifest is the very last write."""
    write_local_manifest(places, step, manifest)
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if not storage.same_place(str(places.local_dir), places.output):
        storage.write_bytes(storage.join(places.remote(step), MANIFEST), data)


def needed_for_resume(relpath: str, ranks: Collection[int]) -> bool:
    """True for the files a node whose local ranks are ``ranks`` needs to resume: their own shards and RNG
    files, and the files every rank reads (the model states, the trainer state); not the hf/ export."""
    if relpath.startswith(HF_DIR + "/"):
        return False
    name = relpath.rsplit("/", 1)[-1]
    if _OWNER_RE.search(name) is None:
        return True
    return owner_rank(relpath) in ranks


def check_world_size(manifest: dict[str, Any], world_size: int, uri: str) -> None:
    """A ZeRO checkpoint is partitioned for the world that wrote it: refuse another world size, saying so."""
    saved = manifest.get("worldSize")
    if isinstance(saved, int) and saved != world_size:
        raise ConfigError(
            f"resources: this job has {world_size} ranks but its latest checkpoint {uri} was written by {saved} "
            f"(ZeRO shards the optimizer state per rank): run it with {saved} ranks again (nodes x gpusPerNode), "
            "or start over with a new checkpoints.output"
        )


def materialise(places: Places, manifest: dict[str, Any], ranks: Collection[int] | None = None) -> Path:
    """Make the files of a complete checkpoint that ``ranks`` need (every file: None) present in the local folder,
    downloading what is missing or has the wrong size."""
    step = int(manifest["step"])
    tag_dir = places.local(step)
    with file_lock(places.lock):
        local_manifest = read_manifest(str(tag_dir))
        for f in manifest["files"]:
            if ranks is not None and not needed_for_resume(f["path"], ranks):
                continue
            dest = tag_dir / f["path"]
            if local_manifest is not None and dest.is_file() and dest.stat().st_size == f["size"]:
                continue
            try:
                storage.download(storage.join(places.remote(step), f["path"]), dest)
            except StorageUnavailableError:
                raise
            except StorageError as err:
                raise StorageError(f"checkpoint {places.remote(step)}: cannot download {f['path']}: {err}") from err
            if dest.stat().st_size != f["size"]:
                raise StorageError(
                    f"checkpoint {places.remote(step)}: {f['path']} has {dest.stat().st_size} bytes, "
                    f"the manifest says {f['size']}"
                )
        write_json(tag_dir / MANIFEST, manifest)
    return tag_dir


def prune_local(places: Places, keep: int) -> list[str]:
    """Delete local checkpoints beyond the newest ``keep`` complete ones (and incomplete older ones)."""
    removed = []
    with file_lock(places.lock):
        tags = list_tags(str(places.local_dir))
        complete = [t for t in tags if (places.local_dir / t / MANIFEST).is_file()]
        keep_set = set(complete[-keep:]) if keep > 0 else set()
        newest_complete = complete[-1] if complete else None
        for t in tags:
            incomplete_old = t not in complete and newest_complete is not None and t < newest_complete
            if (t in complete and t not in keep_set) or incomplete_old:
                shutil.rmtree(places.local_dir / t, ignore_errors=True)
                removed.append(t)
    return removed


def remove_empty_folders(folder: str) -> None:
    """Remove the empty folders under a local folder (after files were deleted from it)."""
    root = Path(folder)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()


def read_state(tag_dir: Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint."""
    doc: dict[str, Any] = json.loads((tag_dir / STATE_FILE).read_text())
    return doc


def zero_state_dict(tag_dir: Path, zero_stage: int, exclude_frozen: bool) -> Mapping[str, LazyTensor]:
    """The model weights of a local DeepSpeed checkpoint folder (fp32 master weights where the optimizer holds them),
    read lazily: the shard files are memory-mapped and each tensor is consolidated by its ``contiguous()``, so the
    caller holds one tensor at a time, never the whole model."""
    ds_tags = [p.name for p in tag_dir.iterdir() if p.is_dir() and p.name.startswith("global_step")]
    if len(ds_tags) != 1:
        raise StorageError(f"{tag_dir}: expected one DeepSpeed folder, found {ds_tags}")
    if zero_stage == 0:
        states = tag_dir / ds_tags[0] / "mp_rank_00_model_states.pt"
        sd = torch.load(states, map_location="cpu", weights_only=False, mmap=True)
        module: dict[str, torch.Tensor] = sd["module"]
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    result: dict[str, LazyTensor] = get_fp32_state_dict_from_zero_checkpoint(
        str(tag_dir), tag=ds_tags[0], exclude_frozen_parameters=exclude_frozen, lazy_mode=True
    )
    return result
