"""Real-model forgetting benchmark (issue 15): SmolLM2-135M-Instruct through the real forge-trainer on CPU.

The base model is forge_dev.realmodel's offline conversion of SmolLM2-135M-Instruct. Corpora (forge_dev.corpora,
all offline and deterministic):
- domain: synthetic support tickets for an invented product line (cpt: plain text; sft: chat records trained on
  the assistant turns), far from what the model was pretrained on;
- general (replayed): Python's reference topics and standard-library docstrings, technical English and code of the
  kind SmolLM2's pretraining mix holds;
- unseen general (never replayed, eval.unseenGeneral): the READMEs of the Python distributions installed beside
  Forge, English prose of many authors the replay does not contain.

Per technique (cpt, sft; --techniques adds lora): domain-only training at the defaults' rate (guard in ``warn``:
the reference that is never stopped), the default mix (domainPercent 75, counted by the operator's default
data.mixBy for the technique: tokens for cpt, lossTokens for sft and lora; --mix-by overrides) at the defaults' rate
(1x, what the operator resolves for ``learningRate: auto``) and at 10x and 30x, with the guard in ``stop``. Each
run is one rank of the real trainer (DeepSpeed on CPU), evaluating and checkpointing at the operator's default
cadence for its length, with the default end-of-run candidates.

Selection and regret: the operator's best-within-budget policy picks from the run's checkpoints and candidates on
the eval splits (forgetting = the worse of the replayed and the unseen general set, as the trainer reports it); the
oracle is best-within-budget on the test splits, judged on the UNSEEN general test split (never replayed, never
used for selection); regret = the oracle's test domain gain minus the selected one's, in points.

Each run's result is saved as <out>/runs/<name>.json as soon as it ends: a second invocation skips finished runs
(resumable per run). Writes <out>/realmodel_forgetting.{md,json,png}; --from-json re-renders them.

Usage: .venv/bin/python benchmarks/realmodel_forgetting.py [--steps 30] [--techniques cpt,sft]
       [--out bench-output/realmodel_forgetting]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from forgetting_sweep import auto_learning_rate as sweep_learning_rate
from forgetting_sweep import pool_of, run_one, select_and_regret

SEQ_LENGTH = 256
MICRO_BATCH = 2
EVAL_TOKENS = 3072
TEST_TOKENS = 6144
MIX_PERCENT = 75  # the ForgeJob default data.domainPercent
FACTORS = (1.0, 10.0, 30.0)


@dataclass(frozen=True)
class Corpora:
    """The benchmark's corpus folders (each holds {train,eval,test}.jsonl; unseen has eval and test only)."""

    general: Path
    domain_text: Path
    domain_chat: Path
    unseen: Path

    def domain(self, technique: str) -> Path:
        return self.domain_text if technique == "cpt" else self.domain_chat


def build_corpora(root: Path) -> Corpora:
    """Write the corpora once under ``root`` (a marker file says a folder is complete)."""
    from forge_dev.corpora import write_domain_corpus, write_general_corpus, write_unseen_corpus

    corpora = Corpora(root / "general", root / "domain-text", root / "domain-chat", root / "unseen")
    writers = {
        corpora.general: lambda f: write_general_corpus(f),
        corpora.domain_text: lambda f: write_domain_corpus(f, chat=False),
        corpora.domain_chat: lambda f: write_domain_corpus(f, chat=True),
        corpora.unseen: lambda f: write_unseen_corpus(f),
    }
    for folder, write in writers.items():
        if not (folder / ".complete").exists():
            write(folder)
            (folder / ".complete").write_text("")
    return corpora


def auto_learning_rate(technique: str, domain_percent: int, steps: int) -> float:
    """What the operator resolves for ``learningRate: auto`` for this run (135M parameters, this batch)."""
    return sweep_learning_rate(domain_percent, steps, 135, technique, SEQ_LENGTH, MICRO_BATCH)


def eval_every(steps: int) -> int:
    """The operator's default eval.everySteps for a run of ``steps``."""
    from forge_operator.defaults import EVALUATIONS_PER_RUN, MAX_EVAL_INTERVAL

    return min(MAX_EVAL_INTERVAL, max(1, round(steps / EVALUATIONS_PER_RUN)))


def config(
    base: Path,
    corpora: Corpora,
    technique: str,
    work: Path,
    domain_percent: int,
    lr: float,
    steps: int,
    budget: float,
    action: str,
    every: int,
) -> dict[str, Any]:
    domain = corpora.domain(technique)
    return {
        "version": 1,
        "jobName": work.name,
        "namespace": "bench",
        # lora: the operator's default adapters (rank 16, alpha 32, 5% dropout, attention projections)
        "model": {"base": str(base), "technique": technique} | ({"lora": {}} if technique == "lora" else {}),
        "data": {
            "domainPercent": domain_percent,
            "domain": [{"uri": str(domain / "train.jsonl")}],
            "general": [] if domain_percent == 100 else [{"uri": str(corpora.general / "train.jsonl")}],
            "seqLength": SEQ_LENGTH,
            "maxRepetition": 20,
        },
        "eval": {
            "everySteps": every,
            "domain": [{"uri": str(domain / "eval.jsonl")}],
            "general": [{"uri": str(corpora.general / "eval.jsonl")}],
            "unseenGeneral": [{"uri": str(corpora.unseen / "eval.jsonl")}],
            "maxTokens": EVAL_TOKENS,
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
            "outputRetention": "dropOptimizerState",
            "exportHf": True,
        },
        "report": {"forgeJob": None, "metricsPort": 0},
    }


class TestSplits:
    """The test splits (never seen by training, evaluation or selection) and the base model's losses on them.

    ``figures(folder)`` is (forgetting %, domain gain %) with forgetting measured on the UNSEEN general test split;
    ``replayed[folder]`` keeps the forgetting on the replayed general set's test split beside it."""

    def __init__(self, base: Path, corpora: Corpora, technique: str, max_tokens: int) -> None:
        from transformers.utils import logging as hf_logging

        from forge_trainer.config import Source, TrainerConfig
        from forge_trainer.data.encode import DocEncoder
        from forge_trainer.heldout import eval_sequences
        from forge_trainer.model import load_tokenizer, pad_token_id

        hf_logging.disable_progress_bar()
        cfg = TrainerConfig.model_validate(
            config(base, corpora, technique, Path("/unused"), 50, 1e-5, 10, 2.0, "stop", 1)
        )
        tokenizer = load_tokenizer(base)
        pad = pad_token_id(tokenizer)
        chat = DocEncoder(tokenizer, assistant_only=technique != "cpt")
        text = DocEncoder(tokenizer, assistant_only=False)

        def seqs(path: Path, encoder: Any) -> Any:
            return eval_sequences([Source(uri=str(path))], max_tokens, cfg, encoder, pad)

        self.sets = {
            "domain": seqs(corpora.domain(technique) / "test.jsonl", chat),
            "general": seqs(corpora.general / "test.jsonl", text),
            "unseen": seqs(corpora.unseen / "test.jsonl", text),
        }
        self.base = self.losses(base)
        self.replayed: dict[str, float] = {}

    def losses(self, folder: Path | str) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM

        from forge_trainer.heldout import evaluate_set

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        out = {}
        for name, seqs in self.sets.items():
            losses, _ = evaluate_set(model, torch.device("cpu"), seqs, 1, 8, 0, 1)
            assert losses.mean is not None, f"no {name} test tokens"
            out[name] = losses.mean
        return out

    def figures(self, folder: Path | str) -> tuple[float, float]:
        now = self.losses(folder)
        b = self.base
        self.replayed[str(folder)] = 100 * (now["general"] - b["general"]) / b["general"]
        return 100 * (now["unseen"] - b["unseen"]) / b["unseen"], 100 * (b["domain"] - now["domain"]) / b["domain"]


@dataclass(frozen=True)
class Plan:
    """One run of the benchmark."""

    technique: str
    domain_percent: int
    factor: float
    action: str
    mix_by: str = "tokens"
    """data.mixBy of the mixed runs (the domain-only reference has nothing to mix)."""

    @property
    def name(self) -> str:
        warn = "-warn" if self.action == "warn" and self.domain_percent != 100 else ""
        by = "-losstokens" if self.mix_by == "lossTokens" and self.domain_percent != 100 else ""
        return f"{self.technique}-dp{self.domain_percent}-x{self.factor:g}{warn}{by}"


def default_mix_by(technique: str) -> str:
    """What the operator resolves for an omitted data.mixBy."""
    from forge_operator.api import ForgeJobSpec
    from forge_operator.defaults import mix_by

    spec = ForgeJobSpec.model_validate(
        {
            "model": {"base": "s3://unused/"},
            "technique": technique,
            "data": {"domain": [{"uri": "s3://d/"}], "general": [{"uri": "s3://g/"}]},
            "checkpoints": {"output": "s3://o/"},
        }
    )
    return mix_by(spec)


def plans(techniques: list[str], factors: list[float], watched: list[float], mix_by: str | None = None) -> list[Plan]:
    """Per technique: the domain-only reference (never stopped), the mix at each factor (guard ``stop``), then the
    mix at each ``watched`` factor with the guard in ``warn``: what a stopped run would have done had it gone on.
    The mixes count ``mix_by`` (None: the operator's default for the technique)."""
    by = {technique: mix_by or default_mix_by(technique) for technique in techniques}
    out = []
    for technique in techniques:
        out.append(Plan(technique, 100, 1.0, "warn"))
        out.extend(Plan(technique, MIX_PERCENT, f, "stop", by[technique]) for f in factors)
    out.extend(Plan(technique, MIX_PERCENT, f, "warn", by[technique]) for technique in techniques for f in watched)
    return out


def run_plan(plan: Plan, base: Path, corpora: Corpora, a: argparse.Namespace, test: TestSplits) -> dict[str, Any]:
    """Train, select and measure one run; its folders are removed afterwards (they hold GBs)."""
    # The mix's 1x rate for every run of a technique: the domain-only reference trains at the rate the defaults
    # use with general replay, so that the two differ in their data alone.
    one_x = auto_learning_rate(plan.technique, MIX_PERCENT, a.steps)
    lr = one_x * plan.factor
    every = a.eval_every or eval_every(a.steps)
    work = a.work / plan.name
    shutil.rmtree(work, ignore_errors=True)
    cfg = config(base, corpora, plan.technique, work, plan.domain_percent, lr, a.steps, a.budget, plan.action, every)
    cfg["checkpoints"]["everySteps"] = every * a.checkpoint_every_evals
    cfg["data"]["mixBy"] = plan.mix_by
    res = run_one(cfg, work)
    res.update(
        name=plan.name,
        technique=plan.technique,
        domainPercent=plan.domain_percent,
        factor=plan.factor,
        action=plan.action,
        mixBy=plan.mix_by,
        learningRate=lr,
        autoLearningRate=one_x,
        budget=a.budget,
        steps=a.steps,
        evalEvery=every,
    )
    pool = pool_of(res, work / "output")
    res.update(select_and_regret(pool, test, a.budget))
    res["pool"] = [
        {k: v for k, v in e.items() if k != "folder"} | {"replayedTest": test.replayed.get(e["folder"])} for e in pool
    ]
    last = max((e for e in pool if e.get("kind", "checkpoint") == "checkpoint"), key=lambda e: e["step"], default=None)
    if last is not None:
        res["lastTest"] = last.get("test")
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--techniques", default="cpt,sft")
    ap.add_argument("--factors", default="1,10,30")
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--watch-factors", default="", help="factors also run with the guard in warn (e.g. 10)")
    ap.add_argument(
        "--mix-by", choices=("tokens", "lossTokens"), help="data.mixBy of the mixes (default: the operator's default)"
    )
    ap.add_argument("--eval-every", type=int, default=0, help="eval.everySteps (0: the operator's default)")
    ap.add_argument("--checkpoint-every-evals", type=int, default=3, help="a checkpoint every N evaluations")
    ap.add_argument("--out", type=Path, default=Path("bench-output/realmodel_forgetting"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the runs (default <out>/work)")
    ap.add_argument("--from-json", type=Path, help="re-render the table and plot of an earlier run's JSON")
    a = ap.parse_args()
    a.work = a.work or a.out / "work"
    if a.from_json is not None:
        doc = json.loads(a.from_json.read_text())
        report(doc["rows"], doc["budget"], a.out)
        return
    from forge_dev.controlplane import cache_dir
    from forge_dev.realmodel import build_real_model

    base = build_real_model().folder
    corpora = build_corpora(cache_dir() / "bench" / "realmodel-corpora")
    runs_dir = a.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tests: dict[str, TestSplits] = {}
    watched = [float(x) for x in a.watch_factors.split(",") if x]
    factors = [float(x) for x in a.factors.split(",")]
    for plan in plans(a.techniques.split(","), factors, watched, a.mix_by):
        saved = runs_dir / f"{plan.name}-s{a.steps}.json"
        if saved.exists():
            rows.append(json.loads(saved.read_text()))
            print(f"{plan.name}: done earlier ({saved})", flush=True)
            continue
        if plan.technique not in tests:
            tests[plan.technique] = TestSplits(base, corpora, plan.technique, TEST_TOKENS)
        started = time.monotonic()
        res = run_plan(plan, base, corpora, a, tests[plan.technique])
        res["wallSeconds"] = round(time.monotonic() - started, 1)
        saved.write_text(json.dumps(res, indent=1))
        rows.append(res)
        print(one_line(res), flush=True)
    doc = {"steps": a.steps, "budget": a.budget, "rows": rows}
    (a.out / "realmodel_forgetting.json").write_text(json.dumps(doc, indent=1))
    report(rows, a.budget, a.out)


def one_line(r: dict[str, Any]) -> str:
    g = r["guard"]
    return (
        f"{r['name']} lr={r['learningRate']:.2g} rc={r['rc']} step={r['step']} forgetting={r['forgetting']} "
        f"gain={r['gain']} guard={g['reason'] + '@' + str(g['step']) if g else '-'} selected={r.get('selected')} "
        f"test={r.get('selectedTest')} regret={r.get('regret')} ({r['wallSeconds']}s)"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| technique | data | LR | evals | last eval: forgetting % (unseen / replayed) | last eval: domain gain % | "
        "guard | selected | selected, test: unseen forgetting % / replayed % / gain % | oracle (test gain %) | "
        "regret (pp) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        g = r["guard"]
        verdict = (
            "-" if not g else f"{g['reason']}@{g['step']}/{r['steps']}" + (" (warn)" if r["action"] == "warn" else "")
        )
        last = r["evals"][-1] if r["evals"] else {}
        st, ot = r.get("selectedTest") or {}, r.get("oracleTest") or {}
        replayed = next((e.get("replayedTest") for e in r.get("pool", []) if e.get("test") == st), None)
        data = "domain only" if r["domainPercent"] == 100 else f"{r['domainPercent']}% domain"
        if r["domainPercent"] != 100 and r.get("mixBy") == "lossTokens":
            data += " by loss tokens"
        gradient = (r.get("mix") or {}).get("realisedDomainGradientPercent")
        if gradient is not None and r["domainPercent"] != 100:
            data += f" ({gradient:.0f}% of the gradient)"
        lines.append(
            f"| {r['technique']} | {data} | {r['factor']:g}x ({r['learningRate']:.2g}) | {len(r['evals'])} | "
            f"{_pct(last.get('unseen_forgetting_percent'))} / {_pct(last.get('general_forgetting_percent'))} | "
            f"{_pct(last.get('domain_gain_percent'))} | {verdict} | {r.get('selected', '-')} | "
            f"{_pct(st.get('forgettingPercent'))} / {_pct(replayed)} / {_pct(st.get('domainGainPercent'))} | "
            f"{r.get('oracle', '-')} ({_pct(ot.get('domainGainPercent'))}) | {_pct(r.get('regret'))} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], budget: float) -> str:
    """The acceptance claims, each with its figures."""
    out = []
    for technique in dict.fromkeys(r["technique"] for r in rows):
        mine = [r for r in rows if r["technique"] == technique]
        reference = next((r for r in mine if r["domainPercent"] == 100), None)
        default = next((r for r in mine if r["domainPercent"] != 100 and r["factor"] == 1), None)
        if reference and default and reference.get("lastTest") and default.get("selectedTest"):
            ref_gain = reference["lastTest"]["domainGainPercent"]
            st = default["selectedTest"]
            within = "within" if st["forgettingPercent"] <= budget else "OVER"
            out.append(
                f"- {technique}: the defaults' selection {default.get('selected')} forgets "
                f"{st['forgettingPercent']:.2f}% on the unseen general test split ({within} the {budget:g}% budget) "
                f"and keeps {100 * st['domainGainPercent'] / ref_gain:.0f}% of the domain-only run's test gain "
                f"({st['domainGainPercent']:.2f}% vs {ref_gain:.2f}%; the domain-only run's last checkpoint forgets "
                f"{reference['lastTest']['forgettingPercent']:.2f}%)"
            )
        for r in mine:
            if r["factor"] >= 30 and r["action"] == "stop":
                g = r["guard"]
                third = r["steps"] / 3
                if g:
                    when = "within" if g["step"] <= third else "AFTER"
                    out.append(
                        f"- {technique} 30x: stopped by the guard at step {g['step']} of {r['steps']} ({when} the "
                        f"first third), {g['reason']}: {g.get('message', '')[:160]}"
                    )
                else:
                    out.append(f"- {technique} 30x: NOT stopped")
        healthy = [r for r in mine if r["factor"] == 1 and r["action"] == "stop"]
        stopped = [r["name"] for r in healthy if r["guard"]]
        out.append(f"- {technique} healthy (1x) runs stopped: " + (", ".join(stopped) or "none"))
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], budget: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    techniques = list(dict.fromkeys(r["technique"] for r in rows))
    fig, axes = plt.subplots(len(techniques), 2, figsize=(11, 3.6 * len(techniques)), squeeze=False)
    for row_axes, technique in zip(axes, techniques, strict=True):
        for i, r in enumerate(x for x in rows if x["technique"] == technique):
            xs = [e["step"] for e in r["evals"]]
            label = ("domain only" if r["domainPercent"] == 100 else f"{r['domainPercent']}%") + f" {r['factor']:g}x"
            if r["domainPercent"] != 100 and r.get("mixBy") == "lossTokens":
                label += " by loss tokens"
            if r["guard"] and r["action"] == "stop":
                label += f" (stopped @{r['guard']['step']})"
            elif r["action"] == "warn" and r["domainPercent"] != 100:
                label += " (guard warns only)"
            look = {"color": f"C{i}", "marker": "x" if r["guard"] and r["action"] == "stop" else ".", "label": label}
            row_axes[0].plot(xs, [e.get("unseen_forgetting_percent") for e in r["evals"]], **look)
            row_axes[1].plot(xs, [e.get("domain_gain_percent") for e in r["evals"]], **look)
        row_axes[0].axhline(budget, color="k", linestyle="--", linewidth=0.8)
        row_axes[0].set(title=f"{technique}: forgetting % on unseen general (eval split)", xlabel="step")
        row_axes[1].set(title=f"{technique}: domain gain % (eval split)", xlabel="step")
        row_axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(rows: list[dict[str, Any]], budget: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows) + "\n\n" + summary(rows, budget)
    print(text)
    (out / "realmodel_forgetting.md").write_text(text + "\n")
    plot(rows, budget, out / "realmodel_forgetting.png")
    print(f"wrote {out / 'realmodel_forgetting.png'}")


if __name__ == "__main__":
    main()
