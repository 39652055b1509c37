"""Peak host memory per rank while a ZeRO-3 engine is built: the model built partitioned vs loaded whole per rank.

A synthetic Llama (about 220M parameters, built from a config and saved once as safetensors under
$FORGE_CACHE_DIR/bench/, in bf16 as published checkpoints are; ``--checkpoint-dtype fp32`` for an fp32 file) is
handed to a ZeRO-3 DeepSpeed engine (torch AdamW, fp32) by 2 and 4 CPU ranks over gloo, two ways:

* ``whole``: the old path: every rank loads the whole model with ``from_pretrained``, then the engine partitions it;
* ``partitioned``: Forge's ZeRO-3 path (``sharded.build_partitioned``): the model is built under zero.Init and each
  rank reads only its own rows of the safetensors file.

Each rank reports three peaks: VmHWM (resident-set high-water mark, /proc/self/status), the highest RssAnon seen by
a sampler thread every 2 ms (anonymous memory only) over the model build and the engine build, and the highest
RssAnon during the model build alone. The last is what a GPU node's host memory must hold per rank: there the
engine's partitions, gradients and optimizer state live on the device, while here on CPU they are host memory too
(ZeRO-3 with fp32 Adam: 16 bytes per parameter / ranks, the same for both paths). safetensors files are
memory-mapped, and pages of a mapped file that a rank touched count in its RSS (as RssFile, shared page cache, not
memory the rank owns), so VmHWM overstates what a rank holds; RssAnon is the memory the rank really allocated.
The table shows the largest figure over ranks.

Two things decide what the figures mean on CPU:

* the checkpoint's dtype: the trainer trains from fp32 weights. From a bf16 file, the whole path converts every
  tensor into anonymous fp32 memory on every rank (the case of a real 7-70B checkpoint); from an fp32 file,
  transformers keeps the tensors as pages of the mapped file, shared by all ranks of a node;
* glibc's allocator: zero.Init allocates each module's full tensors and frees them once partitioned. With glibc's
  default dynamic mmap threshold, those freed blocks stay in the heap of the process (about 0.6 GiB at 220M here),
  which hides the saving. On GPUs those tensors are device memory, so the ranks run with a fixed threshold
  (MALLOC_MMAP_THRESHOLD_=131072: large blocks go back to the system when freed); ``--glibc-default`` shows the
  figures without it.

Usage: .venv/bin/python benchmarks/trainer_zero3_memory.py [--ranks 2 4] [--layers 12] [--checkpoint-dtype bf16|fp32]
       [--glibc-default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.trainer.harness import base_env, free_port  # noqa: E402

VOCAB, HIDDEN, INTER, HEADS = 32000, 1024, 2816, 16


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonPeakSampler:
    """The highest RssAnon of this process (memory it allocated, not mapped file pages), sampled every 2 ms on a
    background thread from ``start()`` until ``stop()``; ``peak_kib()`` also reads it once more now."""

    def __init__(self) -> None:
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, status_kib("RssAnon"))
            time.sleep(0.002)

    def start(self) -> AnonPeakSampler:
        self._thread.start()
        return self

    def peak_kib(self) -> int:
        self._peak = max(self._peak, status_kib("RssAnon"))
        return self._peak

    def stop(self) -> int:
        """Stop sampling; the peak in KiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kib()


def model_folder(layers: int, dtype: str) -> Path:
    """The synthetic model, built and saved once (safetensors in ``dtype``)."""
    cache = Path(os.environ.get("FORGE_CACHE_DIR", Path.home() / ".cache" / "forge")) / "bench"
    folder = cache / f"zero3-llama-h{HIDDEN}-l{layers}-v{VOCAB}" / dtype
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="20GB")
    return folder


def trainer_config(model: Path, work: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "jobName": "bench",
        "namespace": "bench",
        "model": {"base": str(model), "technique": "cpt"},
        "data": {"domainPercent": 100, "domain": [{"uri": str(work) + "/", "weight": 1}], "seqLength": 64},
        "training": {"learningRate": 1e-4, "microBatchSize": 1, "maxSteps": 1, "zeroStage": 3, "precision": "fp32"},
        "checkpoints": {"everySteps": 1, "output": str(work / "out"), "localDir": str(work / "local")},
        "report": {"forgeJob": None, "metricsPort": 0},
    }


def rank_main(mode: str, config: str) -> None:
    """One rank: build the model the ``mode`` way, build the ZeRO-3 engine, print the peaks (JSON)."""
    sampler = AnonPeakSampler().start()
    from forge_trainer import sharded
    from forge_trainer.config import load_config
    from forge_trainer.engine import build_engine, deepspeed_config, dist_env, init_distributed
    from forge_trainer.model import load_model

    cfg = load_config(config)
    denv = dist_env()
    init_distributed(denv, 600)
    path = Path(cfg.model.base)
    started = time.perf_counter()
    if mode == "whole":
        model = load_model(path, cfg.model)
    else:
        model = sharded.build_partitioned(path, cfg.model, deepspeed_config(cfg, denv.world_size))
    built_s = time.perf_counter() - started
    built_anon = sampler.peak_kib()
    engine = build_engine(model, cfg, denv.world_size)
    seconds = time.perf_counter() - started
    peak_anon = sampler.stop()
    out = {"rank": denv.rank, "hwm": status_kib("VmHWM"), "anon": peak_anon, "build_s": built_s, "s": seconds}
    out["built_anon"] = built_anon
    print("BENCH " + json.dumps(out), flush=True)
    del engine


def run(mode: str, world: int, config: Path, glibc_default: bool) -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = base_env(
            {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
        )
        env["MASTER_PORT"] = str(port)
        if not glibc_default:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        argv = [sys.executable, __file__, "--rank-mode", mode, "--config", str(config)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    records = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1200)
        lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{mode} x{world} failed:\n{out[-3000:]}")
        records.append(json.loads(lines[-1][6:]))
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--checkpoint-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--glibc-default", action="store_true", help="glibc's dynamic mmap threshold in the ranks")
    parser.add_argument("--rank-mode", choices=["whole", "partitioned"])
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.rank_mode:
        rank_main(args.rank_mode, args.config)
        return
    folder = model_folder(args.layers, args.checkpoint_dtype)
    from safetensors import safe_open

    params = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            params += sum(_numel(handle, k) for k in handle.keys())  # noqa: SIM118
    print(f"model: {params / 1e6:.0f}M parameters, {params * 4 / 2**30:.2f} GiB in fp32 ({folder})")
    allocator = "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=131072"
    print(f"checkpoint file: {args.checkpoint_dtype}; allocator: {allocator}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "d.jsonl").write_text('{"text": "x"}\n')
        config = work / "config.json"
        config.write_text(json.dumps(trainer_config(folder, work)))
        rows = []
        for world in args.ranks:
            for mode in ("whole", "partitioned"):
                recs = run(mode, world, config, args.glibc_default)
                rows.append(
                    (
                        mode,
                        world,
                        *(max(r[k] for r in recs) for k in ("hwm", "anon", "built_anon")),
                        max(r["s"] for r in recs),
                    )
                )
    head = ("path", "ranks", "peak VmHWM/rank", "peak RssAnon/rank", "RssAnon peak in build", "model+engine s")
    print(f"{head[0]:<12} {head[1]:>5} {head[2]:>16} {head[3]:>18} {head[4]:>20} {head[5]:>15}")
    for mode, world, hwm, anon, built, secs in rows:
        gib = [f"{v / 2**20:.2f} GiB" for v in (hwm, anon, built)]
        print(f"{mode:<12} {world:>5} {gib[0]:>16} {gib[1]:>18} {gib[2]:>20} {secs:>15.1f}")


def _numel(handle: Any, key: str) -> int:
    n = 1
    for d in handle.get_slice(key).get_shape():
        n *= int(d)
    return n


if __name__ == "__main__":
    main()
