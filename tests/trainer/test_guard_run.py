"""The guard in real runs (DeepSpeed ranks on CPU): stop with exit 10 and no retraining, warn, rebalance, healthy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forge_trainer import checkpoint as ckpt
from forge_trainer import storage
from forge_trainer.errors import EXIT_EARLY_STOP
from forge_trainer.guard import REASONS
from tests.trainer.harness import S3Server, assert_ok, merged, run_ranks, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 30
EVERY = 3
BASE_LR = 3e-3


def guard_config(base: dict[str, Any], model: Path, action: str, lr_factor: float, **data: Any) -> dict[str, Any]:
    cfg = merged(
        base,
        data=data,
        training={"maxSteps": STEPS, "learningRate": BASE_LR * lr_factor, "warmupSteps": 0, "schedule": "constant"},
        eval={"everySteps": EVERY},
        forgetting={"budgetPercent": 5, "action": action},
        checkpoints={"everySteps": STEPS, "exportHf": False},
    )
    cfg["model"]["base"] = str(model)
    return cfg


def events_of(results: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in results[0].events if e["event"] == kind]


def test_absurd_learning_rate_stops_early_and_a_rerun_does_not_train(
    base_config: dict[str, Any], pretrained: Path, tmp_path: Path
) -> None:
    cfg = guard_config(base_config, pretrained, "stop", 30.0, domainPercent=100)
    config = write_config(tmp_path / "config.json", cfg)
    results = run_ranks(config, 2, tmp_path / "run", timeout=200)
    assert [r.returncode for r in results] == [EXIT_EARLY_STOP] * 2, "\n".join(r.describe() for r in results)
    guard = events_of(results, "guard")
    assert len(guard) == 1
    verdict = guard[0]
    assert verdict["action"] == "stop" and verdict["reason"] in REASONS and verdict["message"]
    assert verdict["step"] <= STEPS // 3, verdict
    assert "learningRate" in verdict.get("suggestion", {}), verdict
    # a checkpoint at the stop, and the marker a restarted pod reads
    output = cfg["checkpoints"]["output"]
    latest = ckpt.latest_complete(output)
    assert (latest is not None and int(latest["step"]) == verdict["step"]) or verdict["reason"] == "NonFiniteLoss"
    marker = json.loads((Path(output) / "forge-early-stop.json").read_text())
    assert marker["earlyStop"]["reason"] == verdict["reason"]
    # restartPolicy OnFailure restarts the pods: they must end at once, without training
    again = run_ranks(config, 2, tmp_path / "rerun", timeout=60)
    assert_ok(again)
    assert not events_of(again, "step")
    assert events_of(again, "alreadyStopped")[0]["reason"] == verdict["reason"]


def test_a_stop_on_s3_leaves_the_marker_there_and_interpolations_that_forget_less(
    base_config: dict[str, Any], pretrained: Path, tmp_path: Path, bucket: str, s3: S3Server
) -> None:
    cfg = guard_config(base_config, pretrained, "stop", 30.0, domainPercent=100)
    output = f"s3://{bucket}/run/"
    cfg["checkpoints"].update({"output": output, "exportHf": True})
    config = write_config(tmp_path / "config.json", cfg)
    results = run_ranks(config, 2, tmp_path / "run", timeout=240, env=s3.env)
    assert [r.returncode for r in results] == [EXIT_EARLY_STOP] * 2, "\n".join(r.describe() for r in results)
    verdict = events_of(results, "guard")[0]
    if verdict["reason"] == "NonFiniteLoss":
        pytest.skip("NaN stop: no usable weights to interpolate (the local-output test covers the marker)")
    raw = storage.read_bytes(storage.join(output, "forge-early-stop.json"))
    assert raw is not None and json.loads(raw)["earlyStop"]["reason"] == verdict["reason"]
    stop_eval = [e for e in events_of(results, "eval") if e["step"] == verdict["step"]][-1]

    # After the stop, WiSE-FT interpolations of the stop checkpoint walk forgetting back towards the base model.
    candidates = {e["alpha"]: e for e in events_of(results, "candidate") if e["kind"] == "interpolation"}
    assert sorted(candidates) == [0.25, 0.5, 0.75]
    forgetting = [candidates[a]["forgettingPercent"] for a in (0.25, 0.5, 0.75)]
    assert forgetting[0] < forgetting[1] < forgetting[2] < stop_eval["forgetting_percent"], forgetting
    for alpha in candidates:
        assert storage.read_bytes(storage.join(candidates[alpha]["uri"], "forge-manifest.json")) is not None

    again = run_ranks(config, 2, tmp_path / "rerun", timeout=60, env=s3.env)
    assert_ok(again)
    assert not events_of(again, "step") and not events_of(again, "candidate")
    assert events_of(again, "alreadyStopped")[0]["reason"] == verdict["reason"]


def test_healthy_run_is_not_stopped(base_config: dict[str, Any], pretrained: Path, tmp_path: Path) -> None:
    # Half the base rate: with the separators unscored in evaluation the base rate forgets ~6% by step 12.
    cfg = guard_config(base_config, pretrained, "stop", 0.5)
    results = run_ranks(write_config(tmp_path / "config.json", cfg), 1, tmp_path / "run", timeout=200)
    assert_ok(results)
    assert not events_of(results, "guard")
    assert events_of(results, "finished")


def test_warn_keeps_training_and_warns_once_per_reason(
    base_config: dict[str, Any], pretrained: Path, tmp_path: Path
) -> None:
    cfg = guard_config(base_config, pretrained, "warn", 30.0, domainPercent=100)
    results = run_ranks(write_config(tmp_path / "config.json", cfg), 1, tmp_path / "run", timeout=200)
    assert_ok(results)
    guard = events_of(results, "guard")
    assert guard and all(e["action"] == "warn" for e in guard)
    reasons = [e["reason"] for e in guard]
    assert len(reasons) == len(set(reasons))
    assert max(int(e["step"]) for e in events_of(results, "step")) == STEPS


def test_rebalance_lowers_the_domain_share(base_config: dict[str, Any], pretrained: Path, tmp_path: Path) -> None:
    cfg = guard_config(base_config, pretrained, "rebalance", 30.0, domainPercent=100)
    results = run_ranks(write_config(tmp_path / "config.json", cfg), 1, tmp_path / "run", timeout=200)
    assert_ok(results)
    rebalances = events_of(results, "rebalance")
    assert rebalances, [e for e in results[0].events if e["event"] == "guard"]
    first = rebalances[0]
    assert first["previousDomainPercent"] == 100 and first["domainPercent"] == 75
    assert any(e["action"] == "rebalance" for e in events_of(results, "guard"))
    mix = events_of(results, "finished")[0]["mix"]
    assert mix["realisedDomainPercent"] < 99.0, mix
    assert any(row["group"] == "general" and row["tokens"] > 0 for row in mix["sources"]), mix
