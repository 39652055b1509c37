"""The prepare phase and resume from token shards (CPU).

1. Preparation with 1, 2 and 4 ranks on the same files (a fresh cache each time; ranks are processes, one core
   each where there are enough cores): the tokeniser's total work (records, tokens) must stay the same, the
   busiest rank's share must fall, and so does the wall time while there are cores for the ranks.
2. A rerun on the same cache: the tokeniser does nothing.
3. Resume from a data state at 10% and at 90% of one pass over the data: building the mixer from the state and
   reading its first sequence must take the same time wherever the state points (a binary search in the shard's
   document table, no re-reading of what came before). The tokenising path is shown beside it.

Usage: .venv/bin/python benchmarks/trainer_prepare.py [--files 8] [--records 2500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from forge_trainer import tiny
from forge_trainer.config import TrainerConfig
from forge_trainer.data import shards
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import Layout, MixPlan, build_mixer, plan_mix, prepare_shards, step_batches
from forge_trainer.model import load_tokenizer

SEQ = 2048


def config(root: Path, cache: str) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "version": 1,
            "jobName": "bench",
            "namespace": "bench",
            "model": {"base": str(root / "model"), "technique": "cpt"},
            "data": {
                "domainPercent": 70,
                "domain": [{"uri": str(root / "domain")}],
                "general": [{"uri": str(root / "general")}],
                "seqLength": SEQ,
                "maxRepetition": 1000,
                "tokenCache": cache,
            },
            "training": {"learningRate": 1e-4, "microBatchSize": 1, "maxSteps": 1},
            "checkpoints": {"everySteps": 1, "output": str(root / "out"), "localDir": str(root / "local")},
        }
    )


def write_data(root: Path, files: int, records: int) -> None:
    tiny.make_model_folder(root / "model")
    rng = random.Random(0)
    for i in range(files):
        kind = "domain" if i % 2 == 0 else "general"
        gen = tiny.domain_text if kind == "domain" else tiny.general_text
        path = root / kind / f"part-{i:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            for _ in range(records):
                fh.write('{"text": "' + " ".join(gen(rng) for _ in range(8)) + '"}\n')


def _rank(root: Path, cache: str, rank: int, world: int, start: Any, out: Any) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    import torch

    torch.set_num_threads(1)
    cfg = config(root, cache)
    encoder = DocEncoder(load_tokenizer(root / "model"), assistant_only=False)
    plan = plan_mix(cfg.data)
    start.wait()
    t0 = time.perf_counter()
    _, stats = prepare_shards(plan, cfg, encoder, rank, world, lambda obj: [obj])
    out.put((rank, t0, time.perf_counter(), stats))


def bench_prepare(root: Path, world: int, cache: str) -> shards.PrepareStats:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(root, cache, r, world, start, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    total = shards.PrepareStats()
    for _, _, _, st in results:
        total.add(st)
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    busiest = max(r[3].tokens for r in results)
    per_rank = " ".join(f"{r[3].tokens / 1e6:.2f}" for r in sorted(results, key=lambda r: r[0]))
    print(
        f"prepare, {world} rank(s): tokeniser work {total.records} records, {total.tokens / 1e6:.2f} M tokens in "
        f"total; per rank [{per_rank}] M tokens (busiest {busiest / 1e6:.2f} M); files built {total.built}, reused "
        f"{total.reused}; wall {wall:.2f} s"
    )
    return total


def resume_seconds(plan: MixPlan, cfg: TrainerConfig, enc: DocEncoder, state: dict[str, Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mixer = build_mixer(plan, cfg, enc, state)
        mixer.next()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_resume(root: Path, cache: str, repeats: int) -> None:
    cfg = config(root, cache)
    enc = DocEncoder(load_tokenizer(root / "model"), assistant_only=False)
    index, _ = prepare_shards(plan_mix(cfg.data), cfg, enc, 0, 1, lambda obj: [obj])
    sharded = plan_mix(cfg.data, index)
    streamed = plan_mix(cfg.data)
    # One pass over all the data in sequences: walk the stream and take the data states at 10% and 90% of it.
    pass_tokens = sum(src.count_pass_tokens() for src in build_mixer(sharded, cfg, enc).sources)
    steps = pass_tokens // SEQ
    mixer = build_mixer(sharded, cfg, enc)
    layout = Layout(1, 0, 1, 1)
    batches = step_batches(mixer, sharded, cfg, layout, 0)
    states: dict[int, dict[str, Any]] = {}
    for step in range(1, int(steps * 0.9) + 1):
        batch = next(batches)
        if step in (int(steps * 0.1), int(steps * 0.9)):
            states[round(100 * step / steps)] = batch.state
    for pct, state in states.items():
        s = resume_seconds(sharded, cfg, enc, state, repeats)
        t = resume_seconds(streamed, cfg, enc, state, repeats)
        print(
            f"resume at {pct:2d}% of a pass ({pass_tokens / 1e6:.2f} M tokens): from shards {s * 1e3:7.2f} ms, "
            f"tokenising path {t * 1e3:7.2f} ms (median of {repeats})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--records", type=int, default=2500)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    print(f"{len(os.sched_getaffinity(0))} core(s); {args.files} jsonl files x {args.records} records, seq {SEQ}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.files, args.records)
        for world in (1, 2, 4):
            bench_prepare(root, world, str(root / f"cache-{world}"))
        bench_prepare(root, 2, str(root / "cache-2"))  # the second run: nothing to tokenise
        bench_resume(root, str(root / "cache-1"), args.repeats)


if __name__ == "__main__":
    main()
