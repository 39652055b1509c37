"""Peak host memory of ``forge-trainer export`` of a ZeRO-3 checkpoint: consolidated in memory vs streamed.

Two CPU ranks over gloo build the synthetic Llama of ``trainer_zero3_memory.py`` (about 220M parameters, 0.82 GiB
in fp32) partitioned, hand it to a ZeRO-3 engine and save one DeepSpeed checkpoint. Then one process per way
writes a Hugging Face folder from it:

* ``consolidated`` (the export before): every fp32 master weight gathered into one state dict, a whole fp32 model
  loaded beside it with ``from_pretrained``, the state dict loaded into it, ``save_pretrained``: two whole models;
* ``streamed`` (``hf_export.write_hf_folder``, what the export does now): the shards memory-mapped, each tensor
  consolidated as it is written, at most one safetensors shard pending (``FORGE_EXPORT_SHARD_BYTES``).

Each process reports VmHWM, the highest RssAnon seen every 2 ms (memory it allocated, not mapped file pages) and
the seconds. Both outputs are checked equal. With the default 2 GiB shard the whole 0.82 GiB model is one shard, so
the streamed export is also run with 256 MiB shards: what bounds it at 7-70B.

Usage: .venv/bin/python benchmarks/export_memory.py [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from trainer_zero3_memory import AnonPeakSampler, model_folder, status_kib, trainer_config  # noqa: E402

from forge_trainer import tiny  # noqa: E402
from tests.trainer.harness import base_env, free_port  # noqa: E402

SMALL_SHARD_BYTES = 256 * 1024**2


def save_main(config: str, checkpoint: str) -> None:
    """One rank: the partitioned model in a ZeRO-3 engine, saved as one DeepSpeed checkpoint."""
    from forge_trainer import sharded
    from forge_trainer.config import load_config
    from forge_trainer.engine import build_engine, deepspeed_config, dist_env, init_distributed

    cfg = load_config(config)
    denv = dist_env()
    init_distributed(denv, 600)
    model = sharded.build_partitioned(Path(cfg.model.base), cfg.model, deepspeed_config(cfg, denv.world_size))
    engine = build_engine(model, cfg, denv.world_size)
    engine.save_checkpoint(checkpoint, tag="global_step1", save_latest=False)
    print("BENCH {}", flush=True)


def export_main(mode: str, config: str, checkpoint: str, out: str, tokenizer_dir: str) -> None:
    """One export process: write ``out`` the ``mode`` way, print the peaks (JSON)."""
    sampler = AnonPeakSampler().start()
    import torch

    from forge_trainer import checkpoint as ckpt
    from forge_trainer.config import load_config
    from forge_trainer.hf_export import write_hf_folder
    from forge_trainer.model import load_tokenizer, save_hf

    cfg = load_config(config)
    base = Path(cfg.model.base)
    started = time.perf_counter()
    if mode == "consolidated":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from transformers import AutoModelForCausalLM

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag="global_step1")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model.load_state_dict(state, strict=True)
        save_hf(model, Path(out), load_tokenizer(Path(tokenizer_dir)))
    else:
        lazy = ckpt.zero_state_dict(Path(checkpoint), 3, exclude_frozen=False)
        write_hf_folder(lazy, base, cfg.model, Path(out), load_tokenizer(Path(tokenizer_dir)))
    seconds = time.perf_counter() - started
    peak_anon = sampler.stop()
    print("BENCH " + json.dumps({"hwm": status_kib("VmHWM"), "anon": peak_anon, "s": seconds}), flush=True)


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def result(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=1800)
    lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed:\n{out[-3000:]}")
    record: dict[str, Any] = json.loads(lines[-1][6:])
    return record


def same_weights(a: Path, b: Path) -> bool:
    import torch

    from forge_trainer.sharded import TensorSource

    left, right = TensorSource(a), TensorSource(b)
    try:
        return left.keys() == right.keys() and all(torch.equal(left.get(k), right.get(k)) for k in left.file_of)
    finally:
        left.close()
        right.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--save", nargs=2, metavar=("CONFIG", "CHECKPOINT"))
    parser.add_argument("--export", nargs=5, metavar=("MODE", "CONFIG", "CHECKPOINT", "OUT", "TOKENIZER"))
    args = parser.parse_args()
    if args.save:
        save_main(*args.save)
        return
    if args.export:
        export_main(*args.export)
        return
    folder = model_folder(args.layers, "bf16")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "d.jsonl").write_text('{"text": "x"}\n')
        config = work / "config.json"
        config.write_text(json.dumps(trainer_config(folder, work)))
        checkpoint = work / "checkpoint"
        tokenizer = work / "tokenizer"  # the synthetic model has none: the tiny test tokenizer stands in
        tiny.train_tokenizer(["a few words to learn from"] * 4).save_pretrained(str(tokenizer))
        port = free_port()
        ranks = []
        for rank in range(2):
            env = base_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MALLOC_MMAP_THRESHOLD_": "131072"}
            ranks.append(spawn(["--save", str(config), str(checkpoint)], env))
        for rank, proc in enumerate(ranks):
            result(proc, f"saving rank {rank}")
        size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        print(f"ZeRO-3 checkpoint of 2 ranks: {size / 2**30:.2f} GiB on disk (fp32 master weights; no step taken)")
        rows = []
        for mode, shard_bytes in (("consolidated", None), ("streamed", None), ("streamed", SMALL_SHARD_BYTES)):
            env = base_env({"MALLOC_MMAP_THRESHOLD_": "131072"})
            if shard_bytes:
                env["FORGE_EXPORT_SHARD_BYTES"] = str(shard_bytes)
            out = work / f"{mode}-{shard_bytes or 'default'}"
            argv = ["--export", mode, str(config), str(checkpoint), str(out), str(tokenizer)]
            record = result(spawn(argv, env), mode)
            shard = f"{(shard_bytes or 2 * 1024**3) / 2**20:.0f} MiB" if mode == "streamed" else "-"
            rows.append((mode, shard, record, out))
        reference = rows[0][3]
        print(f"{'export':<14} {'shard':>9} {'VmHWM':>10} {'peak RssAnon':>13} {'seconds':>8} {'same weights':>13}")
        for mode, shard, record, out in rows:
            hwm, anon = (f"{record[k] / 2**20:.2f} GiB" for k in ("hwm", "anon"))
            same = "yes" if same_weights(reference, out) else "NO"
            print(f"{mode:<14} {shard:>9} {hwm:>10} {anon:>13} {record['s']:>8.1f} {same:>13}")


if __name__ == "__main__":
    main()
