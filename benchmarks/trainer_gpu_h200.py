"""GPU benchmark (one H200): the Forge trainer vs a bare DeepSpeed ZeRO-2 bf16 loop on a 1.10B Llama-shaped model.

Model: hidden 2048, 22 layers, 32 query / 4 KV heads, intermediate 5632, vocab 32000, seq 2048, random init.
Both sides run in the same invocation, one after the other, each as its own process on the one GPU:

- ``bare``: DeepSpeed ZeRO-2 bf16, torch fused AdamW, micro-batch 8, random tokens, ``model(labels=...)`` loss.
- ``forge-*``: the real ``forge-trainer`` with mixing ON (70% domain / 30% general jsonl sources, tokenised by a
  locally trained byte-level BPE in the trainer's data thread), evaluation off, no checkpoint inside the timing
  (the process is stopped after the timed steps). Variants change only engine settings.

Reported: tokens/s and MFU (6N + 12*L*H*S FLOPs per token over 989.4 TFLOP/s dense bf16) for each, and each
Forge variant's ratio to the bare loop. References measured on an H200 before: bare loop 47.3k tokens/s (35.0%),
HF Trainer + DeepSpeed 44.7k (33.1%), plain torch.compile 59-60k (44-45%). Goal: Forge >= 1.25x bare.

The device image has torch, transformers, tokenizers, peft, prometheus-client but not deepspeed, hjson or pydantic.
Prepare wheels once, here, in the repository root (they are ignored by git and carried to the device)::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps -w .whl deepspeed==0.19.8

and run it (device tool, carry [".whl"], timeout_s 600)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
    export PYTHONPATH=/tmp/site:$PWD/trainer_image:$PWD PYTHONUNBUFFERED=1 && \\
    python3 benchmarks/trainer_gpu_h200.py --out $OUT

``--shape tiny`` runs the same plumbing with a tiny model (CPU or GPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SHAPES: dict[str, dict[str, int]] = {
    "1.1b": {"hidden": 2048, "layers": 22, "heads": 32, "kv": 4, "inter": 5632, "vocab": 32000, "seq": 2048},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv": 2, "inter": 128, "vocab": 1024, "seq": 128},
}
PEAK_BF16 = 989.4e12

# name -> training overrides of the Forge config
VARIANTS: dict[str, dict[str, Any]] = {
    "forge-zero2": {"zeroStage": 2, "compile": False},
    "forge-zero2-compile": {"zeroStage": 2, "compile": True},
    "forge-zero1-compile-mb16": {"zeroStage": 1, "compile": True, "microBatchSize": 16},
}


def flops_per_token(s: dict[str, int]) -> float:
    h, n_layers, inter, vocab, kv, heads = s["hidden"], s["layers"], s["inter"], s["vocab"], s["kv"], s["heads"]
    head_dim = h // heads
    per_layer = h * h * 2 + h * kv * head_dim * 2 + 3 * h * inter  # q,o + k,v + gate/up/down
    params = n_layers * per_layer + vocab * h  # lm_head counts; the input embedding is a lookup
    return 6.0 * params + 12.0 * n_layers * h * s["seq"]


def build_model(folder: Path, s: dict[str, int]) -> None:
    """Random-init Llama + a locally trained byte-level BPE (no hub)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from forge_trainer import tiny

    rng = random.Random(0)
    texts = [tiny.domain_text(rng) for _ in range(20000)] + [tiny.general_text(rng) for _ in range(20000)]
    tok = tiny.train_tokenizer(texts, vocab_size=min(s["vocab"], 8000), chat_template=tiny.CHAT_TEMPLATE)
    cfg = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=s["seq"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))


def build_data(folder: Path, records: int) -> None:
    from forge_trainer import tiny

    rng = random.Random(1)
    for kind, gen in (("domain", tiny.domain_text), ("general", tiny.general_text)):
        path = folder / kind / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            for _ in range(records):
                fh.write(json.dumps({"text": " ".join(gen(rng) for _ in range(24))}) + "\n")


def single_rank_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PET_NPROC_PER_NODE"):
        env.pop(k, None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + random.randint(0, 999)),
        WORLD_SIZE="1",
        RANK="0",
        LOCAL_RANK="0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_bare(model: Path, s: dict[str, int], steps: int, skip: int, micro: int) -> list[float]:
    cmd = [sys.executable, __file__, "--bare-rank", str(model), "--steps", str(steps), "--micro", str(micro)]
    out = subprocess.run(cmd, env=single_rank_env(), capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"bare loop failed:\n{out.stderr[-4000:]}")
    times: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return times[skip:]


def bare_rank(model_dir: str, steps: int, micro: int) -> None:
    """The bare DeepSpeed ZeRO-2 bf16 loop (one process, one GPU)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=torch.cuda.is_available())
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    seq = model.config.max_position_embeddings
    batches = [torch.randint(0, model.config.vocab_size, (micro, seq), device=engine.device) for _ in range(4)]
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        ids = batches[step % len(batches)]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def forge_config(model: Path, data: Path, work: Path, s: dict[str, int], overrides: dict[str, Any]) -> dict[str, Any]:
    training = {
        "learningRate": 2e-4,
        "warmupSteps": 5,
        "microBatchSize": 8,
        "gradientAccumulationSteps": 1,
        "maxSteps": 100000,
        "precision": "bf16",
        "zeroStage": 2,
        "seed": 1,
        "logEverySteps": 5,
        **overrides,
    }
    return {
        "version": 1,
        "jobName": "gpu-bench",
        "namespace": "bench",
        "model": {"base": str(model), "technique": "cpt"},
        "data": {
            "domainPercent": 70,
            "domain": [{"uri": str(data / "domain")}],
            "general": [{"uri": str(data / "general")}],
            "seqLength": s["seq"],
            "maxRepetition": 1000,
        },
        "eval": {"everySteps": 10**6, "domain": [], "general": []},
        "training": training,
        "checkpoints": {"everySteps": 10**6, "output": str(work / "out"), "localDir": str(work / "local")},
        "report": {"metricsPort": 0},
    }


def run_forge(config: Path, flushes: int, skip_flushes: int, timeout: float) -> list[float]:
    """Per-flush tokens/s of a forge-trainer run, stopped after ``flushes`` loss read-backs."""
    cmd = [sys.executable, "-m", "forge_trainer.train", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=single_rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rates: list[float] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        last = None
        for line in proc.stdout:
            if time.monotonic() > deadline:
                break
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            if ev.get("event") == "step" and ev["tokensPerSecond"] != last:
                last = ev["tokensPerSecond"]  # every step of one flush carries the flush's rate
                rates.append(float(last))
                if len(rates) >= flushes:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if len(rates) < flushes:
        raise RuntimeError(f"forge-trainer gave {len(rates)} rates:\n{err[-4000:]}")
    return rates[skip_flushes:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--steps", type=int, default=40, help="timed steps of the bare loop (first 10 skipped)")
    ap.add_argument("--flushes", type=int, default=10, help="Forge loss read-backs (5 steps each; first 3 skipped)")
    ap.add_argument(
        "--variants", default="forge-zero2,forge-zero2-compile", help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/forge-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json")
    ap.add_argument("--bare-rank", help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_rank:
        bare_rank(args.bare_rank, args.steps, args.micro)
        return
    s = SHAPES[args.shape]
    fpt = flops_per_token(s)
    work = args.work
    model, data = work / "model", work / "data"
    t0 = time.time()
    if not (model / "config.json").exists():
        build_model(model, s)
    if not (data / "domain").exists():
        build_data(data, 20000 if args.shape == "1.1b" else 2000)
    print(f"shape {args.shape}: {fpt / 6e9:.2f}B-parameter equivalent, prepared in {time.time() - t0:.0f} s")
    results: dict[str, Any] = {"shape": args.shape, "flopsPerToken": fpt, "peak": PEAK_BF16}

    bare = run_bare(model, s, args.steps, min(10, args.steps // 2), 8)
    bare_tps = 8 * s["seq"] / statistics.median(bare)
    results["bare"] = {"tokensPerSecond": bare_tps, "mfu": bare_tps * fpt / PEAK_BF16}
    print(f"bare DeepSpeed ZeRO-2 bf16: {bare_tps:9.0f} tokens/s  MFU {100 * bare_tps * fpt / PEAK_BF16:5.1f}%")

    for name in [v for v in args.variants.split(",") if v]:
        cfg_path = work / f"{name}.json"
        cfg_path.write_text(json.dumps(forge_config(model, data, work / name, s, VARIANTS[name])))
        try:
            rates = run_forge(cfg_path, args.flushes, min(3, args.flushes // 2), timeout=480)
        except RuntimeError as err:
            print(f"{name}: FAILED: {err}")
            results[name] = {"error": str(err)[-2000:]}
            continue
        tps = statistics.median(rates)
        results[name] = {"tokensPerSecond": tps, "mfu": tps * fpt / PEAK_BF16, "ratioToBare": tps / bare_tps}
        print(f"{name:26s}: {tps:9.0f} tokens/s  MFU {100 * tps * fpt / PEAK_BF16:5.1f}%  x{tps / bare_tps:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
