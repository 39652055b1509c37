"""Forgetting sweep (issue 5, item 5): domainPercent x learning rate through the real forge-trainer on CPU.

The base model is forge_dev.basemodel's cached tiny Llama pretrained on Python's reference prose (general); it is
fine-tuned on synthetic support chats (domain), with the general corpus replayed at 100 - domainPercent. Each run
is one rank of the real trainer (DeepSpeed on CPU) with the guard in action ``stop``, a checkpoint at every
evaluation and the default end-of-run candidates; the held-out sets are the corpora's eval splits.

1x is the learning rate the operator resolves for ``learningRate: auto`` for each cell (forge_operator.defaults:
technique cpt, the model's size, the global batch, the cell's domainPercent), unless --base-lr pins one rate.

Selection and regret: the operator's best-within-budget policy (default budgetConfidencePercent, with the
trainer's standard errors) picks from the run's checkpoints and candidates on the eval split (what it sees in a
real run); the oracle is best-within-budget on a separate test split; regret is
the oracle's test domain gain minus the selected one's, in percentage points (0 = the oracle's pick).

Printed and written (bench-output/forgetting_sweep/forgetting_sweep.{md,json,png}): final (or last before the
stop) forgetting and domain gain, the guard's verdict, the selection and its regret. --from-json re-renders them.

Usage: .venv/bin/python benchmarks/forgetting_sweep.py [--steps 60] [--base-lr auto] [--out benchmarks/out]
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
SEQ_LENGTH = 128
MICRO_BATCH = 8
TEST_TOKENS = 8192
PROBE_MULTIPLIERS = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
CONFIDENCE_LEVELS = [50, 70, 80, 90, 95]  # spec.checkpoints.budgetConfidencePercent values compared in the summary


def config(
    base: Path,
    general: Path,
    domain: Path,
    work: Path,
    domain_percent: int,
    lr: float,
    steps: int,
    budget: float,
    action: str = "stop",
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
            "seqLength": SEQ_LENGTH,
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
            "microBatchSize": MICRO_BATCH,
            "maxSteps": steps,
            "precision": "fp32",
            "zeroStage": 0,
            "seed": 1,
        },
        "forgetting": {"budgetPercent": budget, "action": action},
        "checkpoints": {
            "everySteps": every,
            "output": str(work / "output"),
            "localDir": str(work / "local"),
            "keep": 1,
            "exportHf": True,
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
    baseline = next((e for e in events if e["event"] == "eval" and e["step"] == 0), {})
    finished = next((e for e in events if e["event"] == "finished"), {})
    return {
        "events": [e for e in events if e["event"] in ("probe", "probeResult")],
        "baseline": baseline,
        "candidates": [e for e in events if e["event"] == "candidate"],
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "forgetting": last.get("forgetting_percent"),
        "gain": last.get("domain_gain_percent"),
        "step": last.get("step"),
        "guard": guard[0] if guard else None,
        "curve": [(e["step"], e["forgetting_percent"], e["domain_gain_percent"]) for e in evals],
        "evals": evals,
        "mix": {k: v for k, v in (finished.get("mix") or {}).items() if k.startswith("realised")},
    }


def auto_learning_rate(
    domain_percent: int,
    steps: int,
    params_millions: int,
    technique: str = "cpt",
    seq_length: int = SEQ_LENGTH,
    micro_batch: int = MICRO_BATCH,
) -> float:
    """What the operator resolves for ``learningRate: auto`` for one rank at this model size, batch and mix."""
    from forge_operator.api import ForgeJobSpec
    from forge_operator.defaults import resolve

    spec = ForgeJobSpec.model_validate(
        {
            "model": {"base": "/models/base/", "parametersMillions": params_millions},
            "technique": technique,
            "data": {
                "domainPercent": domain_percent,
                "domain": [{"uri": "/data/domain/"}],
                "general": [] if domain_percent == 100 else [{"uri": "/data/general/"}],
                "seqLength": seq_length,
            },
            "eval": {"general": [{"uri": "/data/general-eval/"}]},
            "training": {
                "globalBatchTokens": seq_length * micro_batch,
                "microBatchSize": micro_batch,
                "maxSteps": steps,
            },
            "resources": {"nodes": 1, "gpusPerNode": 0},
            "checkpoints": {"output": "/out/"},
        }
    )
    return float(resolve(spec).learning_rate)


def pool_of(run: dict[str, Any], output: Path) -> list[dict[str, Any]]:
    """The run's checkpoints (from their manifests) and candidates, as status.checkpoints entries with a folder."""
    from forge_trainer import checkpoint as ckpt

    entries = []
    for manifest in ckpt.complete_checkpoints(str(output)):
        entry = dict(manifest["metrics"])
        entry["folder"] = str(output / manifest["tag"] / "hf")
        entries.append(entry)
    for cand in run["candidates"]:
        entry = {k: v for k, v in cand.items() if k not in ("event", "name")}
        entry["folder"] = cand["uri"]
        entries.append(entry)
    return entries


class TestSplit:
    """The test splits (never seen by training, evaluation or selection) and the base model's losses on them."""

    def __init__(self, base: Path, general: Path, domain: Path, max_tokens: int) -> None:
        from transformers.utils import logging as hf_logging

        from forge_trainer.config import TrainerConfig
        from forge_trainer.data.encode import DocEncoder
        from forge_trainer.heldout import eval_sequences
        from forge_trainer.model import load_tokenizer, pad_token_id

        hf_logging.disable_progress_bar()
        cfg = TrainerConfig.model_validate(config(base, general, domain, Path("/unused"), 50, 1e-5, 10, 2.0))
        tokenizer = load_tokenizer(base)
        encoder, pad = DocEncoder(tokenizer, False), pad_token_id(tokenizer)
        self.domain = eval_sequences([_source(domain / "test.jsonl")], max_tokens, cfg, encoder, pad)
        self.general = eval_sequences([_source(general / "test.jsonl")], max_tokens, cfg, encoder, pad)
        self.base = self.losses(base)

    def losses(self, folder: Path | str) -> tuple[float, float]:
        import torch
        from transformers import AutoModelForCausalLM

        from forge_trainer.heldout import evaluate_set

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        cpu = torch.device("cpu")
        domain, _ = evaluate_set(model, cpu, self.domain, 1, 16, 0, 1)
        general, _ = evaluate_set(model, cpu, self.general, 1, 16, 0, 1)
        assert domain.mean is not None and general.mean is not None
        return domain.mean, general.mean

    def figures(self, folder: Path | str) -> tuple[float, float]:
        """(forgetting %, domain gain %) on the test split."""
        domain, general = self.losses(folder)
        base_domain, base_general = self.base
        return 100 * (general - base_general) / base_general, 100 * (base_domain - domain) / base_domain


def _source(path: Path) -> Any:
    from forge_trainer.config import Source

    return Source(uri=str(path))


def select_and_regret(pool: list[dict[str, Any]], test: TestSplit, budget: float) -> dict[str, Any]:
    """The operator's pick on the eval split against the oracle's on the test split."""
    from forge_operator.api import CheckpointReport, CheckpointSpec
    from forge_operator.selection import select

    if not pool:
        return {}
    reports = [CheckpointReport.model_validate({k: v for k, v in e.items() if k != "folder"}) for e in pool]
    confidence = CheckpointSpec.model_fields["budget_confidence_percent"].default
    picked = select(reports, None, "best-within-budget", budget, confidence).selected
    test_reports = []
    for entry, report in zip(pool, reports, strict=True):
        forgetting, gain = test.figures(entry["folder"])
        entry["test"] = {"forgettingPercent": forgetting, "domainGainPercent": gain}
        test_reports.append(report.model_copy(update={"forgetting_percent": forgetting, "domain_gain_percent": gain}))
    # the oracle knows the test figures exactly: no confidence margin
    exact = [r.model_copy(update={"forgetting_stderr_percent": None}) for r in test_reports]
    oracle = select(exact, None, "best-within-budget", budget).selected
    assert picked is not None and oracle is not None

    def test_of(ref: Any) -> dict[str, float]:
        return next(e["test"] for e in pool if e["uri"] == ref.uri)

    chosen, best = test_of(picked), test_of(oracle)
    by_confidence = {}
    for level in CONFIDENCE_LEVELS:
        pick = select(reports, None, "best-within-budget", budget, level).selected
        assert pick is not None
        figures = test_of(pick)
        by_confidence[str(level)] = {
            "selected": _label(pick),
            "regret": best["domainGainPercent"] - figures["domainGainPercent"],
            "testForgettingPercent": figures["forgettingPercent"],
        }
    return {
        "selected": _label(picked),
        "selectedTest": chosen,
        "oracle": _label(oracle),
        "oracleTest": best,
        "regret": best["domainGainPercent"] - chosen["domainGainPercent"],
        "byConfidence": by_confidence,
    }


def _label(ref: Any) -> str:
    if ref.kind == "interpolation":
        return f"wise{ref.alpha:g}@{ref.step}"
    if ref.kind == "average":
        return f"avg{len(ref.average_of or [])}@{ref.step}"
    return f"ckpt@{ref.step}"


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
    ap.add_argument(
        "--base-lr", default="auto", help="the 1x rate: 'auto' (what the operator resolves per cell) or a number"
    )
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--percents", default="100,95,75,50")
    ap.add_argument("--factors", default="1,10,30")
    ap.add_argument("--out", type=Path, default=Path("bench-output/forgetting_sweep"))
    ap.add_argument(
        "--probe-percent", type=int, default=75, help="domainPercent of the learning-rate probe run (0: none)"
    )
    ap.add_argument("--from-json", type=Path, help="re-render the table and plot of an earlier run's JSON, no training")
    a = ap.parse_args()
    if a.from_json is not None:
        doc = json.loads(a.from_json.read_text())
        report(doc["rows"], doc.get("reference"), a.steps, a.budget, a.out, doc.get("probe"))
        return
    from forge_dev.basemodel import build_base_model

    base = build_base_model()
    params_millions = max(1, round(int(base.report.get("parameters", 1_000_000)) / 1e6))
    a.out.mkdir(parents=True, exist_ok=True)
    test = TestSplit(base.folder, base.general, base.domain, TEST_TOKENS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="forge-sweep-") as tmp:
        for dp in [int(x) for x in a.percents.split(",")]:
            one_x = auto_learning_rate(dp, a.steps, params_millions) if a.base_lr == "auto" else float(a.base_lr)
            for factor in [float(x) for x in a.factors.split(",")]:
                work = Path(tmp) / f"dp{dp}-x{factor:g}"
                cfg = config(base.folder, base.general, base.domain, work, dp, one_x * factor, a.steps, a.budget)
                res = run_one(cfg, work)
                res.update(domainPercent=dp, factor=factor, budget=a.budget, learningRate=one_x * factor)
                res.update(select_and_regret(pool_of(res, work / "output"), test, a.budget))
                rows.append(res)
                g = res["guard"]
                print(
                    f"dp={dp:3d} lr={factor:g}x ({one_x * factor:.2g}) rc={res['rc']} step={res['step']} "
                    f"forgetting={res['forgetting']} gain={res['gain']} "
                    f"guard={g['reason'] + '@' + str(g['step']) if g else '-'} selected={res.get('selected')} "
                    f"regret={res.get('regret')} ({res['seconds']}s)",
                    flush=True,
                )
        # Domain-only training at the rate the defaults use with enough general data (domain factor 1), never
        # stopped (action warn): how much domain gain the mix gives up against training on the domain alone.
        one_x = auto_learning_rate(50, a.steps, params_millions) if a.base_lr == "auto" else float(a.base_lr)
        work = Path(tmp) / "reference"
        cfg = config(base.folder, base.general, base.domain, work, 100, one_x, a.steps, a.budget, action="warn")
        reference = run_one(cfg, work)
        last = ckpt_folder(work / "output")
        forgetting, gain = test.figures(last)
        reference.update(learningRate=one_x, testForgettingPercent=forgetting, testDomainGainPercent=gain)
        print(f"reference: domain only at {one_x:.2g}, test forgetting {forgetting:.2f}%, test gain {gain:.2f}%")
        probed = None
        if a.probe_percent:
            probed = probe_run(base, test, Path(tmp) / "probe", a, params_millions)
    doc = {"steps": a.steps, "budget": a.budget, "rows": rows, "reference": reference, "probe": probed}
    (a.out / "forgetting_sweep.json").write_text(json.dumps(doc, indent=1))
    report(rows, reference, a.steps, a.budget, a.out, probed)


def probe_run(base: Any, test: TestSplit, work: Path, a: argparse.Namespace, params_millions: int) -> dict[str, Any]:
    """The default mix with the learning-rate probe on: which multiple of the auto rate it picks, and what the run
    that follows forgets and gains (selected on eval, measured on test)."""
    dp = a.probe_percent
    one_x = auto_learning_rate(dp, a.steps, params_millions) if a.base_lr == "auto" else float(a.base_lr)
    cfg = config(base.folder, base.general, base.domain, work, dp, one_x, a.steps, a.budget)
    cfg["training"]["probe"] = {
        "multipliers": PROBE_MULTIPLIERS,
        "steps": max(2, a.steps // 5),
        "evaluations": 3,
        "evalMaxTokens": 4096,
    }
    res = run_one(cfg, work)
    result = next((e for e in res.get("events", []) if e["event"] == "probeResult"), None)
    res.update(domainPercent=dp, autoLearningRate=one_x, probeResult=result)
    res.update(select_and_regret(pool_of(res, work / "output"), test, a.budget))
    print(f"probe at dp{dp}: {result}; selected {res.get('selected')} test {res.get('selectedTest')}", flush=True)
    return res


def ckpt_folder(output: Path) -> Path:
    """The hf/ export of the last complete checkpoint in a local output."""
    from forge_trainer import checkpoint as ckpt

    manifest = ckpt.latest_complete(str(output))
    assert manifest is not None, f"no complete checkpoint in {output}"
    return output / manifest["tag"] / "hf"


def report(
    rows: list[dict[str, Any]],
    reference: dict[str, Any] | None,
    steps: int,
    budget: float,
    out: Path,
    probed: dict[str, Any] | None = None,
) -> None:
    """Print and write the table, the claims and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, steps, budget)
    claims = summary(rows, reference, budget) + probe_summary(probed, reference, budget)
    print(table)
    print(claims)
    (out / "forgetting_sweep.md").write_text(table + "\n\n" + claims + "\n")
    try:
        plot(rows, out / "forgetting_sweep.png")
        print(f"wrote {out / 'forgetting_sweep.png'}")
    except ImportError:
        print("matplotlib is not installed: no PNG")


def probe_summary(probed: dict[str, Any] | None, reference: dict[str, Any] | None, budget: float) -> str:
    """The probe run's choice and what the run at that rate gave."""
    if not probed or not probed.get("probeResult"):
        return ""
    result = probed["probeResult"]
    lines = [
        f"\n- learning-rate probe at domainPercent {probed['domainPercent']} (multiples of the auto rate "
        f"{probed['autoLearningRate']:.2g}): picked {result['multiplier']:g}x = {result['learningRate']:.2g}"
    ]
    for e in probed.get("events", []):
        if e["event"] == "probe":
            projected = e.get("projectedForgettingPercent")
            shown = "-" if projected is None else f"{projected:.2f}%"
            lines.append(f"  - {e['multiplier']:g}x: projected forgetting {shown}")
    st = probed.get("selectedTest") or {}
    if st:
        keep = ""
        if reference:
            keep = (
                f", {100 * st['domainGainPercent'] / reference['testDomainGainPercent']:.0f}% of the reference's gain"
            )
        stopped = "stopped by the guard" if probed.get("guard") else "not stopped"
        lines.append(
            f"  - the run at that rate: {stopped}; selected {probed.get('selected')} forgets "
            f"{st['forgettingPercent']:.2f}% on test (budget {budget:g}%), test gain "
            f"{st['domainGainPercent']:.2f}%{keep}"
        )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def within_budget_on_test(row: dict[str, Any], budget: float) -> bool | None:
    test = row.get("selectedTest")
    return None if not test else bool(test["forgettingPercent"] <= budget)


def markdown(rows: list[dict[str, Any]], steps: int, budget: float) -> str:
    lines = [
        "| domainPercent | LR | forgetting % | domain gain % | guard (reason@step) | selected | selected test "
        "forgetting % | selected test gain % | oracle (test) | regret (pp) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        g = r["guard"]
        gs = f"{g['reason']}@{g['step']}/{steps}" if g else "-"
        st, ot = r.get("selectedTest") or {}, r.get("oracleTest") or {}
        regret = _pct(r.get("regret"))
        if within_budget_on_test(r, budget) is False:
            regret += " (over budget on test)"
        lines.append(
            f"| {r['domainPercent']} | {r['factor']:g}x ({r['learningRate']:.2g}) | {_pct(r['forgetting'])} | "
            f"{_pct(r['gain'])} | {gs} | {r.get('selected', '-')} | {_pct(st.get('forgettingPercent'))} | "
            f"{_pct(st.get('domainGainPercent'))} | {r.get('oracle', '-')} {_pct(ot.get('domainGainPercent'))} | "
            f"{regret} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], reference: dict[str, Any] | None, budget: float) -> str:
    """The claims the issue asks the sweep to show, each with its figures."""
    out = []
    one_x = {r["domainPercent"]: r for r in rows if r["factor"] == 1}
    if reference is not None:
        ref = reference["testDomainGainPercent"]
        out.append(
            f"- reference, domain-only training at {reference['learningRate']:.2g} (the defaults' rate with >= 25% "
            f"general), not stopped: test forgetting {reference['testForgettingPercent']:.2f}%, test gain {ref:.2f}%"
        )
        for dp, r in sorted(one_x.items(), reverse=True):
            st = r.get("selectedTest") or {}
            if st:
                out.append(
                    f"- defaults (auto LR {r['learningRate']:.2g}) at domainPercent {dp}: selected {r.get('selected')} "
                    f"forgets {st['forgettingPercent']:.2f}% on test (budget {budget:g}%) and keeps "
                    f"{100 * st['domainGainPercent'] / ref:.0f}% of the reference's test domain gain"
                )
    stopped = [r for r in rows if r["factor"] >= 30]
    out.append(
        "- 30x runs stopped by the guard: "
        + ", ".join(
            f"dp{r['domainPercent']} {r['guard']['reason']}@{r['guard']['step']}"
            if r["guard"]
            else f"dp{r['domainPercent']} not stopped"
            for r in stopped
        )
    )
    healthy = [r for r in rows if r["factor"] == 1]
    out.append("- 1x runs stopped: " + (", ".join(f"dp{r['domainPercent']}" for r in healthy if r["guard"]) or "none"))
    regrets = [r["regret"] for r in rows if r.get("regret") is not None and within_budget_on_test(r, budget)]
    over = [r for r in rows if within_budget_on_test(r, budget) is False]
    if regrets:
        out.append(
            f"- regret (pp of test domain gain) where the selection is within budget on test too: mean "
            f"{sum(regrets) / len(regrets):.2f}, max {max(regrets):.2f} over {len(regrets)} runs; selections over "
            "budget on test: "
            + (
                ", ".join(
                    f"dp{r['domainPercent']} x{r['factor']:g} ({r['selectedTest']['forgettingPercent']:.2f}%)"
                    for r in over
                )
                or "none"
            )
        )
    for level in CONFIDENCE_LEVELS:
        outcomes = [r["byConfidence"][str(level)] for r in rows if r.get("byConfidence")]
        if outcomes:
            regret = [o["regret"] for o in outcomes]
            over = sum(1 for o in outcomes if o["testForgettingPercent"] > budget)
            out.append(
                f"- budgetConfidencePercent {level}: regret mean {sum(regret) / len(regret):.2f} / max "
                f"{max(regret):.2f} pp, selections over budget on test: {over} of {len(outcomes)}"
            )
    derived = [r for r in rows if str(r.get("selected", "")).startswith(("wise", "avg"))]
    out.append(f"- runs whose selection is an end-of-run candidate: {len(derived)} of {len(rows)}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
