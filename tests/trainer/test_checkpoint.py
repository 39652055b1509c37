"""Checkpoint bookkeeping against a real S3 server (moto) and local folders: manifests, completeness, prune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge_trainer import checkpoint as ckpt
from forge_trainer import storage
from forge_trainer.errors import StorageError


def fake_save(places: ckpt.Places, step: int, world: int = 2) -> None:
    """Files shaped like a ZeRO-2 save by ``world`` ranks (contents are irrelevant to the bookkeeping)."""
    d = places.local(step)
    ds = d / f"global_step{step}"
    ds.mkdir(parents=True, exist_ok=True)
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    for r in range(world):
        (ds / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r]) * (50 + r))
        (d / "forge").mkdir(exist_ok=True)
        (d / "forge" / f"rng_rank_{r}.pt").write_bytes(b"r" * 10)
    (d / "forge" / "state.json").write_text(json.dumps({"step": step}))


def publish(places: ckpt.Places, step: int, world: int = 2) -> dict[str, object]:
    files = []
    for r in range(world):
        files += ckpt.upload_owned(places, step, r)
    manifest = ckpt.make_manifest(step, files, {"domainLoss": 1.0}, {"zeroStage": 2})
    ckpt.publish_manifest(places, step, manifest)
    return manifest


def test_owner_rank_of_deepspeed_files() -> None:
    assert ckpt.owner_rank("global_step5/zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert ckpt.owner_rank("global_step5/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert ckpt.owner_rank("global_step5/zero_pp_rank_1_mp_rank_00_model_states.pt") == 1
    assert ckpt.owner_rank("forge/rng_rank_2.pt") == 2
    assert ckpt.owner_rank("global_step5/mp_rank_00_model_states.pt") == 0
    assert ckpt.owner_rank("hf/model.safetensors") == 0


def test_each_rank_uploads_its_own_files_and_the_manifest_lists_all(tmp_path: Path, bucket: str) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    fake_save(places, 5)
    rank1 = ckpt.upload_owned(places, 5, 1)
    assert sorted(p for p, _ in rank1) == [
        "forge/rng_rank_1.pt",
        "global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert ckpt.latest_complete(places.output) is None  # uploaded but no manifest: incomplete
    manifest = publish(places, 5)
    found = ckpt.latest_complete(places.output)
    assert found == manifest
    assert len(found["files"]) == 6  # type: ignore[arg-type]
    keys = {u for u, _ in storage.list_files(places.remote(5))}
    assert f"{places.remote(5)}/{ckpt.MANIFEST}" in keys
    assert len(keys) == 7


def test_half_written_and_corrupt_checkpoints_are_ignored(tmp_path: Path, bucket: str) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    fake_save(places, 5)
    publish(places, 5)
    fake_save(places, 10)
    ckpt.upload_owned(places, 10, 0)  # crashed before rank 1's upload and the manifest
    fake_save(places, 15)
    publish(places, 15)
    storage.write_bytes(f"{places.remote(15)}/{ckpt.MANIFEST}", b"{not json")  # a corrupt manifest
    storage.write_bytes(f"{places.output}/step-00000020/{ckpt.MANIFEST}", json.dumps({"version": 1}).encode())
    assert [m["step"] for m in ckpt.complete_checkpoints(places.output)] == [5]


def test_materialise_downloads_everything_to_a_fresh_node(tmp_path: Path, bucket: str) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    fake_save(places, 5)
    manifest = publish(places, 5)
    fresh = ckpt.Places(tmp_path / "other-node", places.output)
    tag_dir = ckpt.materialise(fresh, manifest)
    for f in manifest["files"]:  # type: ignore[attr-defined]
        assert (tag_dir / f["path"]).read_bytes() == (places.local(5) / f["path"]).read_bytes()
    assert ckpt.read_manifest(str(tag_dir)) == manifest


def test_materialise_fails_on_a_missing_object(tmp_path: Path, bucket: str) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    fake_save(places, 5)
    manifest = publish(places, 5)
    url = storage.parse_s3(places.remote(5) + "/forge/rng_rank_1.pt")
    storage.s3_client().delete_object(Bucket=url.bucket, Key=url.key)
    with pytest.raises(StorageError, match=r"cannot download forge/rng_rank_1\.pt"):
        ckpt.materialise(ckpt.Places(tmp_path / "n2", places.output), manifest)


def test_local_output_needs_no_copy(tmp_path: Path) -> None:
    places = ckpt.Places(tmp_path / "ckpts", str(tmp_path / "ckpts"))
    fake_save(places, 3)
    publish(places, 3)
    assert ckpt.latest_complete(str(tmp_path / "ckpts"))["step"] == 3  # type: ignore[index]


def test_prune_keeps_the_newest_complete(tmp_path: Path) -> None:
    places = ckpt.Places(tmp_path / "local", str(tmp_path / "out"))
    for step in (5, 10, 15, 20):
        fake_save(places, step)
        publish(places, step)
    fake_save(places, 7)  # an old incomplete one (crashed save)
    fake_save(places, 25)  # a newer incomplete one: a save in progress
    removed = ckpt.prune_local(places, keep=2)
    assert sorted(removed) == ["step-00000005", "step-00000007", "step-00000010"]
    assert ckpt.list_tags(str(places.local_dir)) == ["step-00000015", "step-00000020", "step-00000025"]
    assert ckpt.list_tags(places.output) == ["step-00000005", "step-00000010", "step-00000015", "step-00000020"]


def test_prepare_local_clears_a_crashed_save_once(tmp_path: Path) -> None:
    places = ckpt.Places(tmp_path / "local", str(tmp_path / "out"))
    fake_save(places, 5)
    ckpt.prepare_local(places, 5, "save-a")
    assert [p.name for p in places.local(5).iterdir()] == [".forge-save-id"]
    (places.local(5) / "written-by-rank-0").write_text("x")
    ckpt.prepare_local(places, 5, "save-a")  # the second rank of the node must not wipe rank 0's files
    assert (places.local(5) / "written-by-rank-0").exists()


def test_tags() -> None:
    assert ckpt.tag_for(42) == "step-00000042"
    assert ckpt.step_of("step-00000042") == 42
    assert ckpt.step_of("step-42") is None
