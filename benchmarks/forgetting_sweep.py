"""Forgetting sweep (issue 5, item 5): domainPercent x learning rate through the real forge-trainer on CPU.

The base model is forge_dev.basemodel's cached tiny Llama pretrained on Python's reference prose (general); it is
fine-tuned on synthetic support chats (domain), with the general corpus replayed at 100 - domainPercent. Each run
is one rank of the real trainer (DeepSpeed on CPU) with the guard in action ``stop``; the held-out sets are the
corpora's eval splits. Printed: a table of final (or last before the stop) forgetting and domain gain, whether
and when the guard stopped the run and why. Written: a PNG of forgetting and domain gain per cell.

Usage: .venv/bin/python benchmarks/forgetting_sweep.py [--steps 60] [--base-lr 3e-5] [--out benchmarks/out]
       [--percents 100,95,75,50] [--factors 1,10,30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent


def config(
    base: Path, general: Path, domain: Path, work: Path, domain_percent: int, lr: float, steps: int, budget: float
) -> dict[str, Any]:
    every = max(1, steps // 10)
    return {
        "version": 1,
        "jobName": f"sweep-{domain_percent}-{lr:g}",
        "namespace": "bench",
        "model": {"base": str(base), "technique": "cpt"},
        "data": {
            "domainPercent": domain_percent,
            "domain": [{"uri": str(domain / "train.jsonl")}],
            "general": [{"uri": str(general / "train.jsonl")}],
            "seqLength": 128,
            "maxRepetition": 20,
        },
        "eval": {
            "everySteps": every,
            "domain": [{"uri": str(domain / "eval.jsonl")}],
            "general": [{"uri": str(general / "eval.jsonl")}],
            "maxTokens": 8192,
        },
        "training": {
            "learningRate": lr,
            "schedule": "cosine",
            "warmupSteps": max(1, steps // 20),
            "microBatchSize": 8,
            "maxSteps": steps,
            "precision": "fp32",
            "zeroStage": 0,
            "seed": 1,
        },
        "forgetting": {"budgetPercent": budget, "action": "stop"},
        "checkpoints": {
            "everySteps": steps,
            "output": str(work / "output"),
            "localDir": str(work / "local"),
            "keep": 1,
            "exportHf": False,
        },
        "report": {"forgeJob": None, "metricsPort": 0},
    }


def run_one(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.json"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KUBECONFIG")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + (os.getpid() + int(time.time())) % 20000),
        WORLD_SIZE="1",
        RANK="0",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        FORGE_REPORT_FLUSH_S="1",
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(VENV_BIN / "forge-trainer"), "--config", str(path)], env=env, capture_output=True, text=True, check=False
    )
    events = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    evals = [e for e in events if e["event"] == "eval" and e["step"] > 0]
    guard = [e for e in events if e["event"] == "guard"]
    if proc.returncode not in (0, 10):
        sys.stderr.write(proc.stderr[-3000:])
    last = evals[-1] if evals else {}
    return {
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "forgetting": last.get("forgetting_percent"),
        "gain": last.get("domain_gain_percent"),
        "step": last.get("step"),
        "guard": guard[0] if guard else None,
        "curve": [(e["step"], e["forgetting_percent"], e["domain_gain_percent"]) for e in evals],
    }


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    percents = sorted({r["domainPercent"] for r in rows}, reverse=True)
    factors = sorted({r["factor"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for r in rows:
        xs = [c[0] for c in r["curve"]]
        label = f"dp{r['domainPercent']} x{r['factor']:g}" + (" (stopped)" if r["guard"] else "")
        look = {
            "color": f"C{percents.index(r['domainPercent'])}",
            "linestyle": styles[factors.index(r["factor"]) % len(styles)],
            "marker": "x" if r["guard"] else ".",
            "label": label,
        }
        axes[0].plot(xs, [c[1] for c in r["curve"]], **look)
        axes[1].plot(xs, [c[2] for c in r["curve"]], **look)
    axes[0].set(title="forgetting % (general eval)", xlabel="step")
    axes[1].set(title="domain gain % (domain eval)", xlabel="step")
    axes[0].axhline(rows[0]["budget"], color="k", linestyle="--", linewidth=0.8)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--base-lr", type=float, default=3e-5, help="the 1x rate (the operator table's cpt value)")
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--percents", default="100,95,75,50")
    ap.add_argument("--factors", default="1,10,30")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    a = ap.parse_args()
    from forge_dev.basemodel import build_base_model

    base = build_base_model()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forge-sweep-") as tmp:
        for dp in [int(x) for x in a.percents.split(",")]:
            for factor in [float(x) for x in a.factors.split(",")]:
                work = Path(tmp) / f"dp{dp}-x{factor:g}"
                cfg = config(base.folder, base.general, base.domain, work, dp, a.base_lr * factor, a.steps, a.budget)
                res = run_one(cfg, work)
                res.update(domainPercent=dp, factor=factor, budget=a.budget)
                rows.append(res)
                g = res["guard"]
                print(
                    f"dp={dp:3d} lr={factor:g}x rc={res['rc']} step={res['step']} "
                    f"forgetting={res['forgetting']} gain={res['gain']} "
                    f"guard={g['reason'] + '@' + str(g['step']) if g else '-'} ({res['seconds']}s)",
                    flush=True,
                )
    header = "| domainPercent | LR | forgetting % | domain gain % | guard (reason@step) | rc |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        g = r["guard"]
        f = "-" if r["forgetting"] is None else f"{r['forgetting']:.2f}"
        d = "-" if r["gain"] is None else f"{r['gain']:.2f}"
        gs = f"{g['reason']}@{g['step']}/{a.steps}" if g else "-"
        lines.append(f"| {r['domainPercent']} | {r['factor']:g}x | {f} | {d} | {gs} | {r['rc']} |")
    table = "\n".join(lines)
    print(table)
    (a.out / "forgetting_sweep.md").write_text(table + "\n")
    (a.out / "forgetting_sweep.json").write_text(json.dumps(rows, indent=1))
    try:
        plot(rows, a.out / "forgetting_sweep.png")
        print(f"wrote {a.out / 'forgetting_sweep.png'}")
    except ImportError:
        print("matplotlib is not installed: no PNG")


if __name__ == "__main__":
    main()
