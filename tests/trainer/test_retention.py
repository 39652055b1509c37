"""Output retention: which checkpoints keep their training state, and slimming the others in a real S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forge_trainer import checkpoint as ckpt
from forge_trainer import retention, storage
from tests.trainer.test_checkpoint import fake_save


def manifest(step: int, forgetting: float | None, gain: float | None, hf: bool = True) -> dict[str, Any]:
    files = [{"path": f"global_step{step}/mp_rank_00_model_states.pt", "size": 100}]
    if hf:
        files.append({"path": "hf/model.safetensors", "size": 40})
    return {
        "step": step,
        "files": files,
        "metrics": {"forgettingPercent": forgetting, "domainGainPercent": gain},
    }


def test_the_pareto_set_of_the_reports() -> None:
    runs = [manifest(10, 0.5, 5.0), manifest(20, 1.0, 4.0), manifest(30, 1.5, 9.0), manifest(40, 1.5, 9.0)]
    # 20 is dominated by 10 (less forgetting, more gain); 30 and 40 tie and dominate neither each other
    assert retention.pareto_steps(runs) == {10, 30, 40}
    assert retention.pareto_steps([manifest(10, None, 3.0), manifest(20, 1.0, 4.0)]) == {10, 20}  # not judged: kept


def test_what_keeps_its_training_state() -> None:
    runs = [
        manifest(10, 0.2, 2.0),  # Pareto (least forgetting): kept
        manifest(20, 0.9, 1.0),  # dominated: slimmed
        manifest(30, 1.1, 0.5),  # dominated, but the operator selected it: kept
        manifest(40, 1.2, 0.4, hf=False),  # dominated, but no hf/ export to fall back on: kept
        manifest(50, 3.0, 1.5),  # dominated by 10, newest two: kept
        manifest(60, 3.0, 9.0),  # newest: kept
    ]
    assert retention.steps_to_slim(runs, keep_resumable=2, protected={30}) == [20]
    assert retention.steps_to_slim(runs, keep_resumable=5, protected=set()) == []
    slimmed_before = [{**runs[1], "resumable": False}, *runs[2:]]
    assert retention.steps_to_slim(slimmed_before, keep_resumable=2, protected=set()) == [30]


def test_protected_steps_come_from_this_output_only() -> None:
    uris = [
        "s3://b/run/step-00000020",
        "s3://b/run/step-00000030/",
        "s3://b/run/candidates/average-last3-step-00000060",
        "s3://b/other/step-00000040",
    ]
    assert retention.protected_steps("s3://b/run/", uris) == {20, 30}


def test_slimming_keeps_the_export_and_resume_skips_it(tmp_path: Path, bucket: str) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    metrics = {10: (0.2, 1.0), 20: (0.5, 0.5), 30: (0.6, 0.8), 40: (0.7, 4.0)}  # 20 and 30: dominated by 10
    for step, (forgetting, gain) in metrics.items():
        fake_save(places, step)
        (places.local(step) / "hf").mkdir()
        (places.local(step) / "hf" / "model.safetensors").write_bytes(b"w" * 64)
        files = [f for r in range(2) for f in ckpt.upload_owned(places, step, r)]
        entry = {"forgettingPercent": forgetting, "domainGainPercent": gain}
        ckpt.publish_manifest(places, step, ckpt.make_manifest(step, files, entry, {"zeroStage": 2}))

    done = retention.apply_retention(places.output, keep_resumable=2, protected_uris=[])
    assert [(d.step, d.files) for d in done] == [(20, 5)]  # model states, two optimizer shards, two RNG files
    left = sorted(u.rsplit("/step-00000020/", 1)[1] for u, _ in storage.list_files(places.remote(20)))
    assert left == ["forge-manifest.json", "forge/state.json", "hf/model.safetensors"]
    slim = ckpt.read_manifest(places.remote(20))
    assert slim is not None and slim["resumable"] is False and slim["droppedBytes"] == done[0].bytes > 0
    assert [f["path"] for f in slim["files"]] == ["forge/state.json", "hf/model.safetensors"]
    # still complete (selection can pick it), no longer a place to resume from; the newest is
    assert [m["step"] for m in ckpt.complete_checkpoints(places.output)] == [10, 20, 30, 40]
    resume = ckpt.latest_resumable(places.output)
    assert resume is not None and resume["step"] == 40
    # with one resumable kept, 30 could go too, unless it is selected: the selected checkpoint is never slimmed
    assert retention.steps_to_slim(ckpt.complete_checkpoints(places.output), 1, set()) == [30]
    assert retention.apply_retention(places.output, keep_resumable=1, protected_uris=[places.remote(30)]) == []
    assert all(ckpt.is_resumable(m) for m in ckpt.complete_checkpoints(places.output) if m["step"] != 20)
    state = json.loads(storage.read_bytes(places.remote(20) + "/forge/state.json") or b"{}")
    assert state["step"] == 20
