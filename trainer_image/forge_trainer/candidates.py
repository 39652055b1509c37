"""End-of-run candidates: the weight average of the last checkpoints, and WiSE-FT interpolations with the base.

Both often beat any single checkpoint on the forgetting/domain-gain trade-off: averaging smooths the last stretch of
the trajectory, and ``(1 - alpha) * base + alpha * fine-tuned`` walks back towards the base model, buying back
general ability for part of the domain gain. They are built from Hugging Face safetensors folders (the checkpoints'
``hf/`` exports and the base model), one tensor at a time, and written into safetensors shards as they fill, so peak
memory is one shard plus a few tensors.

Each candidate is written to ``<checkpoints.output>/candidates/<name>/`` (a loadable Hugging Face folder) with a
manifest written last, as checkpoints are; a rerun finds a finished candidate by its manifest and does not build it
again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from forge_trainer import storage
from forge_trainer.checkpoint import read_json_object
from forge_trainer.config import CandidateSettings
from forge_trainer.errors import ModelError
from forge_trainer.sharded import INDEX_FILE, TensorSource, shard_bytes_setting, stream_folder

CANDIDATES_DIR = "candidates"
MANIFEST = "forge-manifest.json"
MANIFEST_VERSION = 1

CandidateKind = Literal["average", "interpolation"]


@dataclass(frozen=True)
class CandidatePlan:
    """One candidate to build: an average of checkpoints, or an interpolation of one checkpoint with the base."""

    kind: CandidateKind
    step: int
    """The last averaged step, or the interpolated checkpoint's step."""
    alpha: float | None = None
    """interpolation: weight of the fine-tuned checkpoint (0 = base model, 1 = the checkpoint)."""
    average_of: tuple[int, ...] = ()
    """average: the steps averaged (uniform weights)."""

    @property
    def name(self) -> str:
        """Folder name under ``<output>/candidates/``; the same inputs always give the same name."""
        if self.kind == "average":
            return f"average-last{len(self.average_of)}-step-{self.step:08d}"
        assert self.alpha is not None
        return f"interpolation-{round(self.alpha * 10_000):04d}-step-{self.step:08d}"

    def describe(self) -> str:
        if self.kind == "average":
            return f"average of checkpoints {list(self.average_of)}"
        return f"interpolation (alpha {self.alpha:g}) of step {self.step} with the base model"

    def status_fields(self) -> dict[str, Any]:
        """The fields that tell a candidate from a checkpoint in status.checkpoints."""
        if self.kind == "average":
            return {"kind": "average", "averageOf": list(self.average_of)}
        return {"kind": "interpolation", "alpha": self.alpha}


def plan_candidates(steps: Sequence[int], settings: CandidateSettings) -> list[CandidatePlan]:
    """The candidates of a run whose complete checkpoints are at ``steps``: an average of the last k (when at least
    two exist) and one interpolation of the last checkpoint per alpha."""
    ordered = sorted(set(steps))
    if not ordered:
        return []
    plans: list[CandidatePlan] = []
    k = min(settings.average_last, len(ordered))
    if k >= 2:
        last_k = tuple(ordered[-k:])
        plans.append(CandidatePlan("average", last_k[-1], average_of=last_k))
    plans.extend(CandidatePlan("interpolation", ordered[-1], alpha=a) for a in sorted(settings.interpolation_alphas))
    return plans


# A checkpoint export or the base model, read one tensor at a time (sharded.TensorSource).
WeightFolder = TensorSource


def _same_keys(folders: Sequence[WeightFolder]) -> list[str]:
    keys = folders[0].keys()
    for other in folders[1:]:
        if other.keys() != keys:
            extra = sorted(set(other.keys()) ^ set(keys))[:3]
            raise ModelError(f"{other.folder} and {folders[0].folder} hold different tensors, e.g. {extra}")
    return keys


def iter_average(folders: Sequence[WeightFolder]) -> Iterator[tuple[str, torch.Tensor]]:
    """Uniform average of the floating-point tensors (summed in fp32, stored in each tensor's own dtype), one tensor
    at a time; other tensors are taken from the last folder."""
    keys = _same_keys(folders)
    for key in keys:
        last = folders[-1].get(key)
        if not last.is_floating_point():
            yield key, last.clone()
            continue
        total = last.float()
        for folder in folders[:-1]:
            total = total + folder.get(key).float()
        yield key, (total / len(folders)).to(last.dtype).contiguous()


def iter_interpolate(base: WeightFolder, tuned: WeightFolder, alpha: float) -> Iterator[tuple[str, torch.Tensor]]:
    """``(1 - alpha) * base + alpha * tuned`` for floating-point tensors (fp32 arithmetic, the tuned dtype), one
    tensor at a time."""
    keys = _same_keys([base, tuned])
    for key in keys:
        t = tuned.get(key)
        if not t.is_floating_point():
            yield key, t.clone()
            continue
        yield key, torch.lerp(base.get(key).float(), t.float(), alpha).to(t.dtype).contiguous()


def average_weights(folders: Sequence[WeightFolder]) -> dict[str, torch.Tensor]:
    """:func:`iter_average` as one state dict."""
    return dict(iter_average(folders))


def interpolate_weights(base: WeightFolder, tuned: WeightFolder, alpha: float) -> dict[str, torch.Tensor]:
    """:func:`iter_interpolate` as one state dict."""
    return dict(iter_interpolate(base, tuned, alpha))


def write_folder(
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    like: Path,
    out_dir: Path,
    shard_bytes: int | None = None,
) -> None:
    """A loadable Hugging Face folder: ``weights`` (a state dict, or (name, tensor) pairs written as they come into
    safetensors shards of at most ``shard_bytes``: peak memory one shard), every other file (config, tokenizer,
    generation config) copied from the folder ``like``."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for item in sorted(like.iterdir()):
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_FILE:
            shutil.copyfile(item, out_dir / item.name)
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    stream_folder(pairs, out_dir, shard_bytes or shard_bytes_setting())


def candidate_uri(output: str, plan: CandidatePlan) -> str:
    """Where a candidate lands in the durable output."""
    return storage.join(output, CANDIDATES_DIR, plan.name)


def upload_files(local_dir: Path, uri: str) -> list[tuple[str, int]]:
    """Upload a built candidate's files (not its manifest); returns (relative path, size) of each."""
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    listed = [(p.relative_to(local_dir).as_posix(), p.stat().st_size) for p in files]
    if not storage.same_place(str(local_dir), uri):
        for rel, _ in listed:
            storage.upload(local_dir / rel, storage.join(uri, rel))
    return listed


def fetch_files(uri: str, local_dir: Path, files: Sequence[tuple[str, int]]) -> Path:
    """Make the listed files of a candidate present in ``local_dir`` (ranks on other nodes download them)."""
    for rel, size in files:
        dest = local_dir / rel
        if not (dest.is_file() and dest.stat().st_size == size):
            storage.download(storage.join(uri, rel), dest)
    return local_dir


def publish_manifest(local_dir: Path, uri: str, files: Sequence[tuple[str, int]], entry: dict[str, Any]) -> None:
    """Write the manifest (the file list and the evaluated status entry) last: the candidate now exists."""
    manifest = {
        "version": MANIFEST_VERSION,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"path": rel, "size": size} for rel, size in files],
        "entry": entry,
    }
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    storage.write_bytes(str(local_dir / MANIFEST), data)
    if not storage.same_place(str(local_dir), uri):
        storage.write_bytes(storage.join(uri, MANIFEST), data)


def published_entry(uri: str) -> dict[str, Any] | None:
    """The status entry recorded when a candidate was published earlier (a rerun reuses it), else None."""
    manifest = read_json_object(storage.join(uri, MANIFEST), f"the manifest of {uri}")
    if manifest is None or manifest.get("version") != MANIFEST_VERSION:
        return None
    entry = manifest.get("entry")
    return entry if isinstance(entry, dict) else None
