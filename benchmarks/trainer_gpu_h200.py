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

The device image has torch, transformers, tokenizers, peft, accelerate, prometheus-client, but not deepspeed or
the packages only deepspeed and the trainer's config bring (``WHEELS``). ``--print-setup`` prints the commands that
prepare them once, here, in the repository root (``.whl/`` is ignored by git and carried to the device), and the
command to run on the device (device tool, carry [".whl"], timeout_s 600). The whole run is bounded by
``--budget-s`` (default 540 s): every phase gets a deadline from what is left, each child's stderr goes to a file
(``<work>/<name>.err``; a full pipe cannot block it) and ``results.json`` is rewritten after every phase, so a run
cut short still reports what it measured.

``--shape tiny`` runs the same plumbing with a tiny model (CPU or GPU) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Packages the device image lacks, as wheels for its Python 3.12 (deepspeed's own requirements and the trainer's
# config); tests/trainer/test_gpu_benchmark.py checks this list against deepspeed's and forge-trainer's metadata.
WHEELS = (
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "hjson==3.1.0",
    "einops==0.8.2",
    "msgpack==1.2.4",
    "ninja==1.13.2",
    "py-cpuinfo==9.0.0",
)
DEEPSPEED = "deepspeed==0.19.8"
# What the device image has (distribution names), for the same check.
IMAGE_HAS = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "peft",
    "accelerate",
    "prometheus-client",
    "numpy",
    "packaging",
    "psutil",
    "tqdm",
    "pyyaml",
    "regex",
    "filelock",
)

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
    "forge-zero2-compile-chunked": {"zeroStage": 2, "compile": True, "lossChunkTokens": 1024},
    "forge-zero1-compile-chunked-mb16": {
        "zeroStage": 1,
        "compile": True,
        "lossChunkTokens": 1024,
        "microBatchSize": 16,
    },
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


def run_bare(model: Path, steps: int, skip: int, micro: int, work: Path, timeout: float) -> list[float]:
    cmd = [sys.executable, __file__, "--bare-rank", str(model), "--steps", str(steps), "--micro", str(micro)]
    err_path = work / "bare.err"
    with open(err_path, "w") as err:
        try:
            out = subprocess.run(
                cmd, env=single_rank_env(), stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"bare loop: no result within {timeout:.0f} s:\n{tail(err_path)}") from None
    if out.returncode:
        raise RuntimeError(f"bare loop failed ({out.returncode}):\n{tail(err_path)}")
    times: list[float] = json.loads(out.stdout.strip().splitlines()[-1])
    return times[skip:]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


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


def run_forge(config: Path, windows: int, skip: int, log_every: int, err_path: Path, timeout: float) -> list[float]:
    """Tokens/s of the windows between read-backs of a forge-trainer run, stopped after ``windows`` of them."""
    cmd = [sys.executable, "-m", "forge_trainer.train", "--config", str(config)]
    rates: list[float] = []
    deadline = time.monotonic() + timeout
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=single_rank_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        # a watchdog: stdout may stay silent for long (compilation, a hang); the deadline must hold regardless
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                ev = json.loads(line)
                # every step of a window carries the window's rate; a window ends every log_every steps
                if ev.get("event") == "step" and ev["step"] % log_every == 0 and ev["tokensPerSecond"] is not None:
                    rates.append(float(ev["tokensPerSecond"]))
                    if len(rates) >= windows or time.monotonic() > deadline:
                        break
        finally:
            timer.cancel()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if len(rates) <= skip:
        raise RuntimeError(f"forge-trainer gave {len(rates)} windows within {timeout:.0f} s:\n{tail(err_path)}")
    return rates[skip:]


class Budget:
    """The run's time limit: each phase gets at most its share of what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, phases_left: int, cap: float) -> float:
        return max(0.0, min(cap, self.left() / max(1, phases_left)))


def setup_commands() -> str:
    """Shell commands: wheels prepared here once, and the device command."""
    wheels = " ".join(WHEELS)
    return f"""# here, in the repository root (once)
EXCLUDE="$(git rev-parse --git-path info/exclude)"; grep -qx /.whl/ "$EXCLUDE" || echo /.whl/ >> "$EXCLUDE"
.venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl {wheels}
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps -w .whl {DEEPSPEED}
# on the device (carry [".whl"])
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
export PYTHONPATH=/tmp/site:$PWD/trainer_image:$PWD PYTHONUNBUFFERED=1 && \\
python3 benchmarks/trainer_gpu_h200.py --out $OUT"""


def write_results(out: Path | None, results: dict[str, Any]) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out / "results.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    ap.add_argument("--steps", type=int, default=40, help="timed steps of the bare loop (the first quarter skipped)")
    ap.add_argument("--windows", type=int, default=5, help="Forge windows between read-backs (the first one skipped)")
    ap.add_argument("--log-every", type=int, default=10, help="training.logEverySteps of the Forge runs")
    ap.add_argument(
        "--variants",
        default="forge-zero2,forge-zero2-compile,forge-zero2-compile-chunked",
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    ap.add_argument("--budget-s", type=float, default=540, help="the whole run, preparation included")
    ap.add_argument("--work", type=Path, default=Path("/tmp/forge-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json (rewritten after every phase)")
    ap.add_argument("--print-setup", action="store_true", help="print the wheel preparation and device commands")
    ap.add_argument("--bare-rank", help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.print_setup:
        print(setup_commands())
        return
    if args.bare_rank:
        bare_rank(args.bare_rank, args.steps, args.micro)
        return
    budget = Budget(args.budget_s)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    s = SHAPES[args.shape]
    fpt = flops_per_token(s)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "model", work / "data"
    t0 = time.time()
    if not (model / "config.json").exists():
        build_model(model, s)
    if not (data / "domain").exists():
        build_data(data, 20000 if args.shape == "1.1b" else 300)
    print(
        f"shape {args.shape}: {fpt / 6e9:.2f}B-parameter equivalent, prepared in {time.time() - t0:.0f} s", flush=True
    )
    results: dict[str, Any] = {"shape": args.shape, "flopsPerToken": fpt, "peak": PEAK_BF16, "logEvery": args.log_every}
    results["device"] = device_name()
    write_results(args.out, results)

    try:
        bare = run_bare(model, args.steps, args.steps // 4, 8, work, budget.share(1 + len(variants), 240))
        bare_tps = 8 * s["seq"] / statistics.median(bare)
        results["bare"] = {"tokensPerSecond": bare_tps, "mfu": bare_tps * fpt / PEAK_BF16}
        print(f"bare DeepSpeed ZeRO-2 bf16: {bare_tps:9.0f} tokens/s  MFU {100 * bare_tps * fpt / PEAK_BF16:5.1f}%")
    except RuntimeError as err:
        print(f"bare: FAILED: {err}", flush=True)
        results["bare"] = {"error": str(err)[-2000:]}
        bare_tps = None
    write_results(args.out, results)

    for i, name in enumerate(variants):
        cfg_path = work / f"{name}.json"
        overrides = {**VARIANTS[name], "logEverySteps": args.log_every}
        cfg_path.write_text(json.dumps(forge_config(model, data, work / name, s, overrides)))
        timeout = budget.share(len(variants) - i, 300)
        try:
            rates = run_forge(cfg_path, args.windows, 1, args.log_every, work / f"{name}.err", timeout)
        except RuntimeError as err:
            print(f"{name}: FAILED: {err}", flush=True)
            results[name] = {"error": str(err)[-2000:]}
            write_results(args.out, results)
            continue
        tps = statistics.median(rates)
        row: dict[str, Any] = {"tokensPerSecond": tps, "mfu": tps * fpt / PEAK_BF16, "windows": rates}
        line = f"{name:26s}: {tps:9.0f} tokens/s  MFU {100 * tps * fpt / PEAK_BF16:5.1f}%"
        if bare_tps:
            row["ratioToBare"] = tps / bare_tps
            line += f"  x{tps / bare_tps:.3f}"
        results[name] = row
        print(line, flush=True)
        write_results(args.out, results)
    if args.out is not None:
        for err_file in work.glob("*.err"):
            shutil.copy(err_file, args.out / err_file.name)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
