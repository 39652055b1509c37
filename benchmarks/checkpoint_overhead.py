"""What a checkpoint costs the step loop, synchronous upload vs background upload, and what a resume downloads.

Two ranks of the real ``forge-trainer`` (CPU, gloo, ZeRO-2, fp32) train a small Llama and save a checkpoint every
``--every`` steps to moto's S3 server on loopback, reached through a relay capped at ``--mbps`` MB/s (an S3 link
shared by the node; loopback alone would make any upload look free). Each step's wall time is taken from the
moment rank 0 prints its ``step`` event; the stall of a checkpoint is the wall time of the step that follows the
save minus the median step. ``checkpoints.backgroundUpload: false`` is the synchronous baseline (the pre-issue-11
behaviour: the save waits for every upload). Resume download: the bytes a node needs for its local rank against
the bytes of the whole checkpoint (every rank's shards and the hf/ export), read from the last manifest.

Usage: .venv/bin/python benchmarks/checkpoint_overhead.py [--steps 40] [--every 10] [--mbps 20] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import TcpProxy  # noqa: E402
from tests.trainer.harness import base_env, free_port, moto_server, parse_events, write_config  # noqa: E402

SHAPE = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 768}
SEQ, MICRO, ACCUM, WORLD = 128, 4, 1, 2


def trainer_config(model: Path, data: Path, work: Path, steps: int, every: int, background: bool) -> dict[str, Any]:
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
            "logEverySteps": 1,  # one step event per step: each step's wall time is seen
            "precision": "fp32",
            "zeroStage": 2,
            "seed": 1,
        },
        "checkpoints": {
            "everySteps": every,
            "output": f"s3://bench/{work.name}/",
            "localDir": str(work / "local"),
            "keep": 2,
            "backgroundUpload": background,
        },
        "report": {"metricsPort": 0},
    }


def timed_run(config: Path, work: Path, env: dict[str, str]) -> list[tuple[float, dict[str, Any]]]:
    """Run the ranks; rank 0's events with the time each line arrived."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        rank_env = base_env(env)
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank))
        out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
        with open(work / f"rank{rank}.err", "w") as err:
            argv = [str(Path(sys.executable).parent / "forge-trainer"), "--config", str(config)]
            procs.append(subprocess.Popen(argv, env=rank_env, cwd=work, stdout=out, stderr=err, text=True))
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert procs[0].stdout is not None
        for line in procs[0].stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read)
    reader.start()
    for p in procs:
        p.wait(1800)
    reader.join()
    if any(p.returncode for p in procs):
        tails = "\n".join((work / f"rank{r}.err").read_text()[-3000:] for r in range(WORLD))
        raise SystemExit(f"trainer failed: {[p.returncode for p in procs]}\n{tails}")
    timed = []
    for t, line in lines:
        events = parse_events(line)
        if events:
            timed.append((t, events[0]))
    return timed


def stalls(timed: list[tuple[float, dict[str, Any]]], every: int) -> tuple[float, list[float], list[float]]:
    """(median step seconds, stall per checkpoint in seconds, upload seconds per checkpoint)."""
    step_at = {int(e["step"]): t for t, e in timed if e["event"] == "step"}
    steps = sorted(step_at)
    durations = {s: step_at[s] - step_at[s - 1] for s in steps if s - 1 in step_at}
    plain = [d for s, d in durations.items() if (s - 1) % every != 0 and s > 3]
    median = statistics.median(plain)
    after_save = [durations[s] - median for s in steps if s in durations and (s - 1) % every == 0 and s - 1 > 0]
    uploads = [float(e["uploadSeconds"]) for _, e in timed if e["event"] == "checkpoint" and e.get("uploadSeconds")]
    return median, after_save, uploads


def resume_bytes(output: str) -> tuple[int, dict[int, int]]:
    """(bytes of the whole last checkpoint, bytes a node downloads to resume, per rank)."""
    from forge_trainer import checkpoint as ckpt

    manifest = ckpt.latest_complete(output)
    assert manifest is not None
    files = manifest["files"]
    total = sum(int(f["size"]) for f in files)
    per_rank = {r: sum(int(f["size"]) for f in files if ckpt.needed_for_resume(f["path"], {r})) for r in range(WORLD)}
    return total, per_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--mbps", type=float, default=20.0, help="S3 link speed in MB/s")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    from forge_trainer import storage, tiny

    with tempfile.TemporaryDirectory(prefix="forge-bench-ckpt-") as tmp, moto_server() as s3:
        work = Path(tmp)
        host, port = s3.endpoint.removeprefix("http://").split(":")
        relay = TcpProxy((host, int(port)), bytes_per_second=args.mbps * 1e6)
        relay.up()
        env = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
        os.environ.update(env)
        storage.s3_client.cache_clear()
        storage.s3_client().create_bucket(Bucket="bench")
        model = tiny.make_model_folder(work / "model", **SHAPE)
        tiny.write_corpus(work / "data" / "domain" / "a.jsonl", "domain", 3000, 1, sentences=10)
        tiny.write_corpus(work / "data" / "general" / "a.jsonl", "general", 3000, 2, sentences=10)
        results: dict[str, list[tuple[float, list[float], list[float]]]] = {"synchronous": [], "background": []}
        output = ""
        for r in range(args.rounds):
            order = ["synchronous", "background"] if r % 2 == 0 else ["background", "synchronous"]
            for mode in order:
                run = work / f"{mode}-{r}"
                run.mkdir()
                cfg = trainer_config(model, work / "data", run, args.steps, args.every, mode == "background")
                timed = timed_run(write_config(run / "config.json", cfg), run, env)
                results[mode].append(stalls(timed, args.every))
                output = cfg["checkpoints"]["output"]
                median, stall, uploads = results[mode][-1]
                print(
                    f"round {r} {mode:11s}: median step {median * 1000:6.0f} ms, stall per checkpoint "
                    f"{', '.join(f'{s:.2f}' for s in stall)} s, uploads {', '.join(f'{u:.2f}' for u in uploads)} s",
                    flush=True,
                )
        total, per_rank = resume_bytes(output)
        relay.down()
        print(f"model {SHAPE}, {WORLD} ranks, CPU, ZeRO-2 fp32; S3 link {args.mbps:g} MB/s")
        print(f"checkpoint {total / 1e6:.1f} MB")
        for mode, rows in results.items():
            stall = [s for _, st, _ in rows for s in st]
            median = statistics.median(m for m, _, _ in rows)
            print(
                f"{mode:11s}: median step {median * 1000:.0f} ms; stall per checkpoint: "
                f"mean {statistics.mean(stall):.2f} s, max {max(stall):.2f} s over {len(stall)} checkpoints"
            )
        for rank, size in per_rank.items():
            share = 100 * size / total
            print(f"resume download, node of rank {rank}: {size / 1e6:.1f} of {total / 1e6:.1f} MB ({share:.0f}%)")


if __name__ == "__main__":
    main()
