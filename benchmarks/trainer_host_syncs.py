"""Host syncs per step: the Forge trainer's step loop vs a bare DeepSpeed loop (CPU, 2 ranks, gloo, tiny model).

Counted in rank 0 with tests/trainer/host_syncs.py: reads of device values by the host (item/float/bool/tolist)
and collectives, split into the engine's part of a step (DeepSpeed's own: the bare loop pays the same) and the
loop's part (Forge's bookkeeping after the step). Steps are grouped into logging steps (loss read-back, and the
evaluations and checkpoints when due) and the steps between them; the goal is 0 loop syncs between logging steps.

Usage: .venv/bin/python benchmarks/trainer_host_syncs.py [--steps 30] [--log-every 10] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.trainer.harness import write_config  # noqa: E402
from tests.trainer.host_syncs import forge_step_syncs, run_counted_ranks  # noqa: E402

SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}
SEQ, MICRO, ACCUM, WORLD = 64, 4, 2, 2


def forge_config(model: Path, data: Path, work: Path, steps: int, log_every: int | None, precision: str) -> Any:
    training: dict[str, Any] = {
        "learningRate": 1e-3,
        "warmupSteps": 2,
        "microBatchSize": MICRO,
        "gradientAccumulationSteps": ACCUM,
        "maxSteps": steps,
        "precision": precision,
        "zeroStage": 2,
        "seed": 1,
    }
    if log_every is not None:
        training["logEverySteps"] = log_every
    return {
        "version": 1,
        "jobName": "syncs",
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
        "training": training,
        "checkpoints": {
            "everySteps": 10**6,
            "output": str(work / "out"),
            "localDir": str(work / "local"),
            "exportHf": False,
            "candidates": {"averageLast": 0, "interpolationAlphas": []},
        },
        "report": {"metricsPort": 0},
    }


def bare_rank(model_dir: str, steps: int, precision: str, out: str) -> None:
    """One rank of a bare DeepSpeed loop (no loss read-back), counting host syncs per step."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from tests.trainer.host_syncs import SyncCounter, count_tolist

    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "train_batch_size": MICRO * ACCUM * WORLD,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    ids = torch.randint(0, model.config.vocab_size, (MICRO, SEQ))
    counter = SyncCounter()
    undo = count_tolist(counter)
    per_step = []
    with counter:
        for _ in range(steps):
            before = counter.snapshot()
            for _ in range(ACCUM):
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
            after = counter.snapshot()
            per_step.append({"engine_reads": after[0] - before[0], "engine_collectives": after[1] - before[1]})
    undo()
    if os.environ.get("RANK") == "0":
        Path(out).write_text(json.dumps(per_step))


def flush_steps(steps: int, log_every: int) -> set[int]:
    """The steps at which the loop reads back (the last step always: the run's end)."""
    return {s for s in range(1, steps + 1) if s % log_every == 0} | {steps}


def summary(records: list[dict[str, int]], keys: tuple[str, ...]) -> str:
    if not records:
        return "none"
    parts = []
    for k in keys:
        vals = [r[k] for r in records]
        parts.append(f"{k} mean {statistics.mean(vals):.2f} (min {min(vals)}, max {max(vals)})")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=None, help="training.logEverySteps (default: the trainer's)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--bare-rank", help=argparse.SUPPRESS)
    ap.add_argument("--bare-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_rank:
        bare_rank(args.bare_rank, args.steps, args.precision, args.bare_out)
        return
    from forge_trainer import tiny
    from forge_trainer.config import TrainingSettings

    default_every = TrainingSettings.model_fields["log_every_steps"].default
    log_every = args.log_every or default_every
    with tempfile.TemporaryDirectory(prefix="forge-syncs-") as tmp:
        work = Path(tmp)
        model = tiny.make_model_folder(work / "model", **SHAPE)
        tiny.write_corpus(work / "data" / "domain" / "a.jsonl", "domain", 600, 1)
        tiny.write_corpus(work / "data" / "general" / "a.jsonl", "general", 600, 2)
        cfg = forge_config(model, work / "data", work / "run", args.steps, args.log_every, args.precision)
        records = forge_step_syncs(write_config(work / "config.json", cfg), WORLD, work / "run")
        flushes = flush_steps(args.steps, log_every)
        between = [r for r in records if r["step"] not in flushes]
        at = [r for r in records if r["step"] in flushes and r["step"] != args.steps]
        bare_out = work / "bare.json"
        bare_argv = [__file__, "--bare-rank", str(model), "--steps", str(args.steps), "--precision", args.precision]
        run_counted_ranks([*bare_argv, "--bare-out", str(bare_out)], WORLD, work / "bare")
        bare = json.loads(bare_out.read_text())
    keys = ("loop_reads", "loop_collectives", "engine_reads", "engine_collectives")
    print(f"forge trainer, {args.precision}, logEverySteps {log_every}, {args.steps} steps, rank 0:")
    print(f"  between logging steps ({len(between)}): {summary(between, keys)}")
    print(f"  logging steps ({len(at)}, the last one excluded): {summary(at, keys)}")
    print(f"bare DeepSpeed loop, {args.steps} steps: {summary(bare, ('engine_reads', 'engine_collectives'))}")


if __name__ == "__main__":
    main()
