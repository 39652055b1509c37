"""Retention in the output: which checkpoints keep their training state, and dropping it from the others.

Every checkpoint in the output holds the optimizer state (about 12 bytes per parameter with Adam in fp32, far more
than the 2-4 bytes of its hf/ export). Only the newest few are needed to resume; the others matter for their
weights, which the selection may still pick. After each completed save, rank 0 keeps the whole checkpoint for

- the newest ``checkpoints.keepResumable`` resumable checkpoints,
- the selected entry (``status.selected``) and the operator's Pareto set (``status.paretoFront``), read from the
  ForgeJob (a read error skips the pass: it is not an empty selection),
- the Pareto set of the trainer's own reports (no entry has both less forgetting and more domain gain),

and drops the training state (DeepSpeed files, RNG states) of every other checkpoint that has an hf/ export, keeping
the export and ``forge/state.json``. The manifest is rewritten first (the smaller file list, ``resumable: false``),
then the files are deleted: a crash in between leaves unlisted files behind, never a manifest that lists missing
files. Only complete checkpoints older than the newest complete one are ever touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from forge_trainer import checkpoint as ckpt
from forge_trainer import storage

log = logging.getLogger(__name__)


def _metric(manifest: dict[str, Any], key: str) -> float | None:
    value = (manifest.get("metrics") or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def pareto_steps(manifests: Iterable[dict[str, Any]]) -> set[int]:
    """Steps of the checkpoints no other checkpoint dominates (less or equal forgetting and more or equal domain
    gain, one of them strictly); checkpoints without both figures are not judged (and so are kept)."""
    points = []
    unjudged = set()
    for m in manifests:
        forgetting, gain = _metric(m, "forgettingPercent"), _metric(m, "domainGainPercent")
        if forgetting is None or gain is None:
            unjudged.add(int(m["step"]))
        else:
            points.append((int(m["step"]), forgetting, gain))
    front = {
        step for step, f, g in points if not any((f2 <= f and g2 >= g) and (f2 < f or g2 > g) for _, f2, g2 in points)
    }
    return front | unjudged


def steps_to_slim(manifests: list[dict[str, Any]], keep_resumable: int, protected: set[int]) -> list[int]:
    """Steps of the resumable checkpoints (oldest first) whose training state can go: not among the newest
    ``keep_resumable`` resumable ones, not protected, not on the trainer's Pareto set, and with an hf/ export."""
    resumable = [m for m in manifests if ckpt.is_resumable(m)]
    newest = {int(m["step"]) for m in resumable[-keep_resumable:]} if keep_resumable > 0 else set()
    keep = newest | protected | pareto_steps(manifests)
    return [int(m["step"]) for m in resumable if int(m["step"]) not in keep and _has_export(m)]


def _has_export(manifest: dict[str, Any]) -> bool:
    return any(str(f["path"]).startswith(ckpt.HF_DIR + "/") for f in manifest["files"])


def _kept_after_slimming(path: str) -> bool:
    return path.startswith(ckpt.HF_DIR + "/") or path == ckpt.STATE_FILE


@dataclass(frozen=True)
class Slimmed:
    """One checkpoint whose training state was dropped."""

    step: int
    files: int
    bytes: int


def slim(output: str, manifest: dict[str, Any]) -> Slimmed:
    """Drop a complete checkpoint's training state from the output: the new manifest first, then the files."""
    step = int(manifest["step"])
    uri = storage.join(output, ckpt.tag_for(step))
    kept = [f for f in manifest["files"] if _kept_after_slimming(str(f["path"]))]
    dropped = [f for f in manifest["files"] if not _kept_after_slimming(str(f["path"]))]
    size = sum(int(f["size"]) for f in dropped)
    slimmed = {**manifest, "files": kept, "resumable": False, "droppedBytes": size}
    storage.write_bytes(storage.join(uri, ckpt.MANIFEST), json.dumps(slimmed, indent=1, sort_keys=True).encode())
    storage.delete_files([storage.join(uri, str(f["path"])) for f in dropped])
    if not storage.is_s3(uri):
        ckpt.remove_empty_folders(uri)
    return Slimmed(step, len(dropped), size)


def protected_steps(output: str, uris: Iterable[str]) -> set[int]:
    """Steps of the checkpoints of this output among ``uris`` (status.selected, status.paretoFront)."""
    prefix = output.rstrip("/") + "/"
    steps = set()
    for uri in uris:
        if uri.startswith(prefix):
            step = ckpt.step_of(uri[len(prefix) :].strip("/"))
            if step is not None:
                steps.add(step)
    return steps


def apply_retention(output: str, keep_resumable: int, protected_uris: Iterable[str]) -> list[Slimmed]:
    """One retention pass over the output (rank 0): slim what the policy lets go; returns what it slimmed."""
    manifests = ckpt.complete_checkpoints(output)
    protected = protected_steps(output, protected_uris)
    done = []
    for step in steps_to_slim(manifests, keep_resumable, protected):
        manifest = next(m for m in manifests if int(m["step"]) == step)
        done.append(slim(output, manifest))
        log.info("retention: dropped the training state of %s (%d bytes)", ckpt.tag_for(step), done[-1].bytes)
    return done
