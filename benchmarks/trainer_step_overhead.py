"""Forge trainer step time vs a bare DeepSpeed loop on the same tiny model (CPU, 2 ranks, gloo), eval excluded.

The bare loop: the same model, the same DeepSpeed config (ZeRO-2, fp32, torch AdamW, clipping, scheduler),
pre-built random token batches, ``model(input_ids, labels=...)``, ``engine.backward``, ``engine.step``, no data
pipeline, no metrics, no reports. The Forge trainer runs the real ``forge-trainer`` command (jsonl sources,
tokeniser, token-exact mixing in its background thread, Prometheus, the guard, loss read-back every
``training.logEverySteps`` steps). The trainer times windows of steps between read-backs (its ``tokensPerSecond``);
the bare loop's steps are grouped into windows of the same size. Step time is the median over steady-state windows
(the first window is skipped); evaluation and checkpoints fall outside the timed steps. Goal: ratio <= 1.02.

Usage: .venv/bin/python benchmarks/trainer_step_overhead.py [--steps 60] [--rounds 3] [--log-every N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.trainer.harness import base_env, free_port, parse_events, write_config  # noqa: E402

SHAPE = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 384}
SEQ, MICRO, ACCUM, WORLD = 128, 8, 2, 2


def forge_config(model: Path, data: Path, work: Path, steps: int, log_every: int) -> dict[str, Any]:
    return {
        "version": 1,
        "jobName": "bench",
        "namespace": "bench",
        "model": {"base": str(model), "technique": "cpt"},
        "data": {
            "domainPercent": 70,
            "domain": [{"uri": str(data / "domain")}],
            "general": [{"uri": str(data / "general")}],
            "seqLength": SEQ,
            "maxRepetition": 100,
        },
        "eval": {"everySteps": 10**6, "domain": [], "general": []},
        "training": {
            "learningRate": 1e-3,
            "warmupSteps": 2,
            "microBatchSize": MICRO,
            "gradientAccumulationSteps": ACCUM,
            "maxSteps": steps,
            "precision": "fp32",
            "zeroStage": 2,
            "seed": 1,
            "logEverySteps": log_every,
        },
        "checkpoints": {"everySteps": 10**6, "output": str(work / "out"), "localDir": str(work / "local")},
        "report": {"metricsPort": 0},
    }


def launch(cmd: list[str], env_extra: dict[str, str], cwd: Path) -> list[subprocess.Popen[str]]:
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = base_env(env_extra)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank))
        out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
        with open(cwd / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True))
    return procs


def failure(what: str, procs: list[subprocess.Popen[str]], cwd: Path) -> SystemExit:
    tails = "\n".join(f"--- rank {i} ---\n{(cwd / f'rank{i}.err').read_text()[-3000:]}" for i in range(len(procs)))
    return SystemExit(f"{what} failed: {[p.returncode for p in procs]}\n{tails}")


def step_times_forge(config: Path, work: Path, steps: int, log_every: int) -> list[float]:
    """Mean step time of each window between read-backs, the first window skipped."""
    procs = launch([str(Path(sys.executable).parent / "forge-trainer"), "--config", str(config)], {}, work)
    out, _ = procs[0].communicate(timeout=1800)
    for p in procs[1:]:
        p.wait(600)
    if any(p.returncode for p in procs):
        raise failure("forge-trainer", procs, work)
    step_tokens = WORLD * MICRO * ACCUM * SEQ
    events = [e for e in parse_events(out) if e["event"] == "step"]
    assert len(events) == steps, len(events)
    # every step of a window carries the window's rate: one time per window, at its last step
    times = [step_tokens / e["tokensPerSecond"] for e in events if e["step"] % log_every == 0]
    return times[1:]


def windows(times: list[float], size: int) -> list[float]:
    """Mean of each full window of ``size`` steps, the first window skipped (as the trainer's read-backs)."""
    return [statistics.mean(times[i : i + size]) for i in range(size, len(times) - size + 1, size)]


def step_times_bare(model: Path, work: Path, steps: int, log_every: int) -> list[float]:
    procs = launch([sys.executable, __file__, "--bare-rank", str(model), "--steps", str(steps)], {}, work)
    out, _ = procs[0].communicate(timeout=1800)
    for p in procs[1:]:
        p.wait(600)
    if any(p.returncode for p in procs):
        raise failure("bare loop", procs, work)
    times: list[float] = json.loads(out.strip().splitlines()[-1])
    return windows(times, log_every)


def bare_rank(model_dir: str, steps: int) -> None:
    """One rank of the bare DeepSpeed loop (run as a subprocess with the distributed env)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "train_batch_size": MICRO * ACCUM * WORLD,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (MICRO, SEQ)) for _ in range(8)]
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for m in range(ACCUM):
            ids = batches[(step * ACCUM + m) % len(batches)]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - t0)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=None, help="training.logEverySteps (default: the trainer's)")
    ap.add_argument("--bare-rank", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_rank:
        bare_rank(args.bare_rank, args.steps)
        return
    from forge_trainer import tiny
    from forge_trainer.config import TrainingSettings

    log_every = args.log_every or TrainingSettings.model_fields["log_every_steps"].default
    if args.steps < 3 * log_every:
        raise SystemExit(f"--steps {args.steps}: at least 3 windows of {log_every} steps are needed")

    with tempfile.TemporaryDirectory(prefix="forge-bench-") as tmp:
        work = Path(tmp)
        model = tiny.make_model_folder(work / "model", **SHAPE)
        # Documents of a few hundred tokens, as real corpora have (not one-line records).
        tiny.write_corpus(work / "data" / "domain" / "a.jsonl", "domain", 3000, 1, sentences=10)
        tiny.write_corpus(work / "data" / "general" / "a.jsonl", "general", 3000, 2, sentences=10)
        forge: list[float] = []
        bare: list[float] = []
        ratios: list[float] = []
        for r in range(args.rounds):
            cfg = write_config(
                work / f"config{r}.json", forge_config(model, work / "data", work / f"run{r}", args.steps, log_every)
            )
            # Alternate the order too: whatever else runs on the machine should hit both alike.
            if r % 2:
                f_round = step_times_forge(cfg, work, args.steps, log_every)
                b_round = step_times_bare(model, work, args.steps, log_every)
            else:
                b_round = step_times_bare(model, work, args.steps, log_every)
                f_round = step_times_forge(cfg, work, args.steps, log_every)
            bare += b_round
            forge += f_round
            rb, rf = statistics.median(b_round), statistics.median(f_round)
            ratios.append(rf / rb)
            print(f"round {r}: bare {rb * 1000:.1f} ms, forge {rf * 1000:.1f} ms, ratio {rf / rb:.3f}", flush=True)
        f, b = statistics.median(forge), statistics.median(bare)
        print(f"model {SHAPE}, seq {SEQ}, micro {MICRO} x accum {ACCUM} x {WORLD} ranks (CPU, gloo, ZeRO-2, fp32)")
        print(f"logEverySteps {log_every}: windows of {log_every} steps, the first one skipped in each run")
        print(f"bare DeepSpeed loop: median step {b * 1000:7.1f} ms over {len(bare)} windows")
        print(f"forge trainer:       median step {f * 1000:7.1f} ms over {len(forge)} windows")
        print(
            f"ratio forge/bare:    {f / b:.3f} of medians; per round {min(ratios):.3f}-{max(ratios):.3f} (goal <= 1.02)"
        )
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
