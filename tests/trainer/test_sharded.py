"""The ZeRO-3 model lifecycle (sharded.py): partition arithmetic, per-slice reads, sharded exports, and real runs.

The runs use 2 DeepSpeed ranks over gloo on CPU in fp32 with ZeRO-3: the model is built partitioned (each rank reads
only its own rows of the safetensors file), trains, resumes after a restart with the same per-step losses, and exports
an HF folder (gathered one parameter at a time, written in several shards) that transformers loads and that matches
the fp32 master weights of the DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from forge_trainer import candidates as cand
from forge_trainer import checkpoint as ckpt
from forge_trainer.sharded import (
    INDEX_FILE,
    ShardWriter,
    TensorSource,
    lora_export_name,
    partition_range,
    rows_covering,
    shard_file_names,
)
from tests.trainer.conftest import Corpora, make_base_config, tied_copy
from tests.trainer.harness import (
    assert_ok,
    base_env,
    free_port,
    merged,
    run_export,
    run_ranks,
    step_losses,
    write_config,
)

# ---- pure parts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 100, 4097])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partitions_tile_the_tensor_in_rank_order(numel: int, world: int) -> None:
    ranges = [partition_range(numel, world, r) for r in range(world)]
    covered = [i for start, count in ranges for i in range(start, start + count)]
    assert covered == list(range(numel))
    assert all(count <= math.ceil(numel / world) for _, count in ranges)
    with pytest.raises(ValueError, match="outside"):
        partition_range(numel, world, world)


def test_rows_covering_a_flat_range() -> None:
    assert rows_covering((10, 4), 5, 6) == (1, 3, 1)  # elements 5..10 lie in rows 1 and 2, from offset 1
    assert rows_covering((10, 4), 8, 4) == (2, 3, 0)
    assert rows_covering((12,), 3, 5) == (3, 8, 0)
    assert rows_covering((3, 2, 2), 4, 4) == (1, 2, 0)
    assert rows_covering((10, 4), 40, 0) == (0, 0, 0)


def test_shard_names_and_peft_names() -> None:
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert (
        lora_export_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert lora_export_name("base_model.model.model.norm.weight") == "model.norm.weight"
    assert lora_export_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None


def test_each_rank_reads_exactly_its_partition(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {"a": torch.randn(13, 5), "b": torch.randn(7), "c": torch.randn(3, 4, 5), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = TensorSource(tmp_path)
    for key, full in tensors.items():
        for world in (1, 2, 3, 4):
            parts = [source.flat_range(key, *partition_range(full.numel(), world, r)) for r in range(world)]
            assert torch.equal(torch.cat(parts), full.reshape(-1)), (key, world)
    source.close()


def test_shard_writer_splits_by_size_and_indexes(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    writer = ShardWriter(tmp_path / "out", shard_bytes=1000)
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.finish()
    assert names == shard_file_names(3)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["weight_map"] == {"t0": names[0], "t1": names[0], "t2": names[1], "t3": names[1], "t4": names[2]}
    folder = cand.WeightFolder(tmp_path / "out")
    assert all(torch.equal(folder.get(k), v) for k, v in tensors.items())
    single = ShardWriter(tmp_path / "one", shard_bytes=10**6)
    single.add("x", torch.ones(3))
    assert single.finish() == ["model.safetensors"] and not (tmp_path / "one" / INDEX_FILE).exists()


# ---- real ranks ----------------------------------------------------------------------------------------------

STEPS, EVERY = 6, 3
SHARD_ENV = {"FORGE_EXPORT_SHARD_BYTES": "60000"}  # the tiny model's export spans several shards


def zero3_config(tiny_model: Path, corpora: Corpora, root: Path) -> dict[str, Any]:
    return merged(
        make_base_config(tiny_model, corpora, root),
        training={"zeroStage": 3, "maxSteps": STEPS, "warmupSteps": 1},
        eval={"everySteps": EVERY},
        checkpoints={"everySteps": EVERY, "keep": 3, "candidates": {"averageLast": 2, "interpolationAlphas": [0.5]}},
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_workers(config: Path, record: Path, export: Path | None = None) -> list[str]:
    """tests.trainer.sharded_worker on two ranks; their outputs (both must exit 0)."""
    port = free_port()
    extra = [] if export is None else [str(export)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.trainer.sharded_worker", str(config), str(record), *extra],
            env=base_env(
                {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1"}
                | {"MASTER_PORT": str(port), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=200)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_model_is_built_partitioned(tiny_model: Path, corpora: Corpora, tmp_path: Path, tied: bool) -> None:
    model = tied_copy(tiny_model, tmp_path / "tied-model") if tied else tiny_model
    config = write_config(tmp_path / "config.json", zero3_config(model, corpora, tmp_path))
    run_workers(config, tmp_path / "record")
    base = TensorSource(model)
    assert ("lm_head.weight" in base.file_of) is not tied
    for rank in range(2):
        record = json.loads((tmp_path / f"record.{rank}").read_text())
        assert record["partitioned"] is True
        assert record["tied"] is tied
        params = record["params"]
        assert set(params) == set(base.file_of)  # every tensor of the file is a parameter, and nothing else
        for name, p in params.items():
            assert p["dsNumel"] == base.get(name).numel(), name
            assert p["data"] == 0 and p["partition"] == math.ceil(p["dsNumel"] / 2), name
        assert all(record["equal"].values()), [k for k, v in record["equal"].items() if not v]


def test_a_failed_write_on_rank_0_does_not_leave_the_other_ranks_in_the_gathers(
    tiny_model: Path, corpora: Corpora, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.json", zero3_config(tiny_model, corpora, tmp_path))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the export's parent folder should be")
    run_workers(config, tmp_path / "record", export=blocker / "hf")
    records = [json.loads((tmp_path / f"record.{rank}").read_text()) for rank in range(2)]
    # Rank 0 reports its write error after the last gather; rank 1 took part in every gather and finished.
    assert records[0]["export"].startswith(("FileExistsError", "NotADirectoryError", "OSError")), records[0]["export"]
    assert records[1]["export"] == "done"


@dataclass(frozen=True)
class Zero3Run:
    cfg: dict[str, Any]
    config: Path
    events: list[dict[str, Any]]
    root: Path


@pytest.fixture(scope="module")
def zero3_run(tiny_model: Path, corpora: Corpora, tmp_path_factory: pytest.TempPathFactory) -> Zero3Run:
    root = tmp_path_factory.mktemp("zero3")
    cfg = zero3_config(tiny_model, corpora, root)
    config = write_config(root / "config.json", cfg)
    results = run_ranks(config, 2, root / "run", timeout=600, env=SHARD_ENV)
    assert_ok(results)
    return Zero3Run(cfg, config, results[0].events, root)


@pytest.mark.timeout(700)
def test_zero3_trains_and_exports_the_trained_weights(zero3_run: Zero3Run, tmp_path: Path) -> None:
    losses = step_losses(zero3_run.events)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    output = Path(zero3_run.cfg["checkpoints"]["output"])
    live = output / ckpt.tag_for(STEPS) / ckpt.HF_DIR
    assert (live / INDEX_FILE).is_file()  # written shard by shard
    assert json.loads((live / "config.json").read_text())["use_cache"] is True
    exported = weights(live)
    proc = run_export(zero3_run.config, str(output / ckpt.tag_for(STEPS)), tmp_path / "offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    masters = weights(tmp_path / "offline")  # the fp32 master weights of the ZeRO-3 checkpoint
    base = weights(Path(zero3_run.cfg["model"]["base"]))
    assert exported.keys() == masters.keys() == base.keys()
    for key in masters:
        assert torch.allclose(exported[key], masters[key], atol=1e-6), key
    assert any(not torch.allclose(exported[k], base[k]) for k in base)


@pytest.mark.timeout(700)
def test_zero3_candidates_are_evaluated_in_the_engine_module(zero3_run: Zero3Run) -> None:
    from transformers import AutoModelForCausalLM

    from forge_trainer.config import load_config
    from forge_trainer.data.encode import DocEncoder
    from forge_trainer.heldout import eval_sequences, evaluate_set
    from forge_trainer.model import load_tokenizer, pad_token_id

    events = {e["name"]: e for e in zero3_run.events if e["event"] == "candidate"}
    output = Path(zero3_run.cfg["checkpoints"]["output"])
    average = f"average-last2-step-{STEPS:08d}"
    assert sorted(events) == [average, f"interpolation-5000-step-{STEPS:08d}"]
    hf = {s: weights(output / ckpt.tag_for(s) / ckpt.HF_DIR) for s in (EVERY, STEPS)}
    built = weights(output / cand.CANDIDATES_DIR / average)
    for key, value in built.items():
        assert torch.allclose(value, (hf[EVERY][key] + hf[STEPS][key]) / 2, atol=1e-6), key
    cfg = load_config(zero3_run.config)
    tokenizer = load_tokenizer(Path(cfg.model.base))
    encoder, pad = DocEncoder(tokenizer, False), pad_token_id(tokenizer)
    domain = eval_sequences(cfg.eval.domain, cfg.eval.max_tokens, cfg, encoder, pad)
    for name, event in events.items():
        model = AutoModelForCausalLM.from_pretrained(str(output / cand.CANDIDATES_DIR / name))
        d, _ = evaluate_set(model, torch.device("cpu"), domain, 1, 4, 0, 1)
        assert event["domainLoss"] == pytest.approx(d.mean, abs=2e-4), name


@pytest.mark.timeout(700)
def test_zero3_resumes_with_the_same_losses(zero3_run: Zero3Run) -> None:
    cfg = merged(
        zero3_run.cfg,
        checkpoints={"localDir": str(zero3_run.root / "local-restart"), "candidates": {"averageLast": 0}},
    )
    config = write_config(zero3_run.root / "restart.json", cfg)
    shutil.rmtree(Path(cfg["checkpoints"]["output"]) / ckpt.tag_for(STEPS))  # the restart resumes at step 3
    results = run_ranks(config, 2, zero3_run.root / "restart", timeout=600, env=SHARD_ENV)
    assert_ok(results)
    assert [e["step"] for e in results[0].events if e["event"] == "resumed"] == [EVERY]
    before, after = step_losses(zero3_run.events), step_losses(results[0].events)
    assert sorted(after) == list(range(EVERY + 1, STEPS + 1))
    for step in after:
        assert after[step] == before[step], (step, after[step], before[step])


@pytest.mark.timeout(700)
def test_lora_under_zero3_trains_resumes_and_exports_a_merged_model(
    tiny_model: Path, corpora: Corpora, tmp_path: Path
) -> None:
    cfg = merged(
        zero3_config(tiny_model, corpora, tmp_path),
        model={"technique": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj"]}},
        data={"domainPercent": 80, "domain": [{"uri": str(corpora.chat)}]},
        eval={"domain": [{"uri": str(corpora.eval_chat)}]},
        training={"learningRate": 2e-2},
        checkpoints={"candidates": {"averageLast": 0, "interpolationAlphas": []}},
    )
    config = write_config(tmp_path / "config.json", cfg)
    results = run_ranks(config, 2, tmp_path / "run", timeout=600, env=SHARD_ENV)
    assert_ok(results)
    losses = step_losses(results[0].events)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]

    output = Path(cfg["checkpoints"]["output"])
    manifest = ckpt.latest_complete(str(output))
    assert manifest is not None and manifest["step"] == STEPS
    # The training state is the adapters' (weights and Adam moments): no rank saved its partition of the frozen base
    # weights (together those would be the size of the base model's file).
    training_state = sum(f["size"] for f in manifest["files"] if not f["path"].startswith(f"{ckpt.HF_DIR}/"))
    assert 0 < training_state < sum(p.stat().st_size for p in tiny_model.glob("*.safetensors")) / 4

    exported, base = weights(output / ckpt.tag_for(STEPS) / ckpt.HF_DIR), weights(tiny_model)
    assert exported.keys() == base.keys()  # adapters merged away: a plain Llama folder
    changed = {k for k in base if not torch.equal(exported[k], base[k])}
    assert changed and all(".q_proj." in k for k in changed), changed

    restart = merged(cfg, checkpoints={"localDir": str(tmp_path / "local-restart")})
    shutil.rmtree(output / ckpt.tag_for(STEPS))
    results = run_ranks(write_config(tmp_path / "restart.json", restart), 2, tmp_path / "restart", timeout=600)
    assert_ok(results)
    after = step_losses(results[0].events)
    assert sorted(after) == list(range(EVERY + 1, STEPS + 1))
    for step in after:
        assert after[step] == losses[step], (step, after[step], losses[step])
