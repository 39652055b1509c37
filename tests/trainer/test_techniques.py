"""Other techniques and engine settings end to end: LoRA SFT (one pod, two local processes, status reported to a
real ForgeJob) and ZeRO-3 in bf16 with both exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from forge_trainer import checkpoint as ckpt
from forge_trainer.config import ForgeJobRef
from tests.trainer.conftest import Corpora
from tests.trainer.harness import assert_ok, merged, run_export, run_ranks, step_losses, write_config
from tests.trainer.test_report import forgejob_body, read_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def forgejob_ref(cluster: Any, namespace: str) -> ForgeJobRef:
    from kubernetes import client

    with cluster.api_client() as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "forge.dev", "v1alpha1", namespace, "forgejobs", forgejob_body("lora-run")
        )
    return ForgeJobRef(namespace=namespace, name="lora-run")


@pytest.mark.timeout(300)
def test_lora_sft_in_one_pod_with_two_processes_reports_to_the_forgejob(
    base_config: dict[str, Any], corpora: Corpora, tmp_path: Path, cluster: Any, forgejob_ref: ForgeJobRef
) -> None:
    cfg = merged(
        base_config,
        model={
            "technique": "lora",
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        },
        data={"domainPercent": 80, "domain": [{"uri": str(corpora.chat)}]},
        eval={"everySteps": 4, "domain": [{"uri": str(corpora.eval_chat)}]},
        training={"learningRate": 2e-2, "maxSteps": 8, "warmupSteps": 1},
        checkpoints={"everySteps": 4},
        report={"forgeJob": forgejob_ref.to_json_dict(), "minIntervalSeconds": 1},
    )
    config = write_config(tmp_path / "config.json", cfg)
    results = run_ranks(
        config, 2, tmp_path / "run", nproc_per_node=2, env={"KUBECONFIG": str(cluster.kubeconfig)}, timeout=280
    )
    assert_ok(results)
    assert len(results) == 1  # one pod; its two local ranks were started by the trainer itself
    events = results[0].events
    losses = step_losses(events)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1], losses

    status = read_status(cluster, forgejob_ref)
    assert status["progress"]["step"] == 8 and status["progress"]["percent"] == 100.0
    assert status["baseline"]["domainLoss"] > 0 and status["baseline"]["generalLoss"] > 0
    saved = [c for c in status["checkpoints"] if "kind" not in c]
    assert [c["step"] for c in saved] == [4, 8]
    assert saved[-1]["uri"] == f"{cfg['checkpoints']['output']}/step-00000008"
    assert all(c["complete"] for c in status["checkpoints"])
    # End-of-run candidates from the merged LoRA exports: the average of both checkpoints and three interpolations.
    derived = sorted((c["kind"], c.get("alpha") or 0.0) for c in status["checkpoints"] if "kind" in c)
    assert derived == [("average", 0.0), ("interpolation", 0.25), ("interpolation", 0.5), ("interpolation", 0.75)]
    assert all(c["domainGainPercent"] is not None for c in status["checkpoints"])
    assert abs(status["latest"]["realisedDomainPercent"] - 80) <= 1
    assert status["latest"]["domainGainPercent"] > 0

    manifest = ckpt.latest_complete(cfg["checkpoints"]["output"])
    assert manifest is not None
    # LoRA checkpoints leave the frozen base weights out: they are the base model's.
    model_states = [f for f in manifest["files"] if f["path"].endswith("mp_rank_00_model_states.pt")]
    assert model_states and model_states[0]["size"] < 100_000

    merged_dir = Path(cfg["checkpoints"]["output"]) / "step-00000008" / "hf"
    assert json.loads((merged_dir / "config.json").read_text())["use_cache"] is True
    merged_w = weights(merged_dir)
    base_w = weights(Path(cfg["model"]["base"]))
    assert merged_w.keys() == base_w.keys()  # adapters merged away: a plain Llama folder
    changed = {k for k in base_w if not torch.equal(merged_w[k], base_w[k])}
    assert changed
    assert all(".q_proj." in k or ".v_proj." in k for k in changed), changed

    out = tmp_path / "export"
    proc = run_export(config, f"{cfg['checkpoints']['output']}/step-00000008", out, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = weights(out)
    for k in base_w:
        assert torch.allclose(offline[k], merged_w[k], atol=1e-6), k


@pytest.mark.timeout(300)
def test_zero3_bf16_trains_and_both_exports_agree(base_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = merged(
        base_config,
        training={"precision": "bf16", "zeroStage": 3, "maxSteps": 4, "warmupSteps": 0},
        eval={"everySteps": 2},
        checkpoints={"everySteps": 4},
    )
    config = write_config(tmp_path / "config.json", cfg)
    results = run_ranks(config, 2, tmp_path / "run", timeout=280)
    assert_ok(results)
    losses = step_losses(results[0].events)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    out = tmp_path / "export"
    proc = run_export(config, f"{cfg['checkpoints']['output']}/step-00000004", out, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp32 = weights(out)  # from the fp32 master weights of the ZeRO-3 shards
    live = Path(cfg["checkpoints"]["output"]) / "step-00000004" / "hf"
    bf16 = weights(live)  # gathered 16-bit weights
    base = weights(Path(cfg["model"]["base"]))
    for folder in (live, out):  # exports are for serving: the KV cache training turned off is on again
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True, folder
    for k in fp32:
        assert torch.allclose(fp32[k], bf16[k], atol=2e-2, rtol=1e-2), k
    assert any(not torch.allclose(fp32[k], base[k]) for k in fp32)
