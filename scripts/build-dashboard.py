#!/usr/bin/env python3
"""Writes the Forge Grafana dashboard, charts/forge/dashboards/forge.json, from the panel list below.

The dashboard is generated so that every panel follows the same conventions (datasource variable, ForgeJob and
namespace filters, units): edit this file and run it (`.venv/bin/python scripts/build-dashboard.py`), never the JSON
by hand. It builds the dashboard with Grafana's foundation SDK for Python (grafana-foundation-sdk, pinned in
requirements-dev.txt, installed by `make venv`). It also writes the table of panels and their PromQL into
docs/monitoring.md. tests/chart/test_dashboard.py fails when either differs from this script's output, and runs every
PromQL expression against a real Prometheus that scraped a CPU training run.

Metric names come from operator/forge_operator/metrics.py (forge_forgejobs, forge_reconcile_*, ...) and
trainer_image/forge_trainer/metrics.py (forge_trainer_*, labels forge_job, namespace, rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dashboard_b
from grafana_foundation_sdk.builders import prometheus as prometheus_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as timeseries_b
from grafana_foundation_sdk.builders import xychart as xychart_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_m
from grafana_foundation_sdk.models import xychart as xychart_m

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "charts" / "forge" / "dashboards" / "forge.json"
DOC = ROOT / "docs" / "monitoring.md"
DOC_START, DOC_END = "<!-- dashboard-panels:start -->", "<!-- dashboard-panels:end -->"
DS = dashboard_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The schema version written before the SDK port; the SDK's Dashboard builder has no setter for it (default 36).
SCHEMA_VERSION = 39
# Trainer series of the selected ForgeJobs.
SEL = 'namespace=~"$namespace", forge_job=~"$forgejob"'
BY_JOB = "namespace, forge_job"
# Exported by the trainer (trainer_image/forge_trainer/metrics.py).
BUDGET = "forge_trainer_forgetting_budget_percent"  # trainer: spec.forgetting.budgetPercent of the run
# Exported by the operator (operator/forge_operator/metrics.py), labels namespace, forge_job.
SELECTED_STEP = "forge_forgejob_selected_step"  # status.selected.step
REPORTED_CHECKPOINTS = "forge_forgejob_checkpoints"  # complete saved checkpoints in status.checkpoints
# Stall and straggler detection (issue 14). STALLED from the operator; the others from the trainer, labels forge_job,
# namespace, rank.
STALLED = "forge_forgejob_stalled"  # 1 while Progressing=False, reason Stalled
RANK_STEP = "forge_trainer_rank_step_seconds"  # each rank's recent median step compute time
STRAGGLER = "forge_trainer_straggler_rank"  # 1 for a rank named as straggler
DATA_WAIT = "forge_trainer_data_wait_ratio"  # share of step time waiting for the next batch

Override = dashboard_b.DashboardFieldConfigSourceOverrides
Item = timeseries_b.Panel | stat_b.Panel | xychart_b.Panel | dashboard_b.Row


def target(expr: str, legend: str, ref: str = "A") -> prometheus_b.Dataquery:
    return prometheus_b.Dataquery().datasource(DS).expr(expr).legend_format(legend).ref_id(ref).range()


def legend() -> common_b.VizLegendOptions:
    return (
        common_b.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs([])
    )


def timeseries(
    title: str,
    description: str,
    targets: list[prometheus_b.Dataquery],
    unit: str = "short",
    decimals: int | None = None,
    overrides: list[Override] | None = None,
    stack: bool = False,
    min_zero: bool = False,
) -> timeseries_b.Panel:
    panel = (
        timeseries_b.Panel()
        .span(12)
        .height(8)
        .title(title)
        .description(description)
        .datasource(DS)
        .targets(list(targets))
        .unit(unit)
        .color_scheme(dashboard_b.FieldColor().mode(dashboard_m.FieldColorModeId.PALETTE_CLASSIC))
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(2)
        .fill_opacity(10 if stack else 0)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(True)
        .stacking(
            common_b.StackingConfig().mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE).group("A")
        )
        .overrides(list(overrides or []))
        .legend(legend())
        .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if decimals is not None:
        panel.decimals(decimals)
    if min_zero:
        panel.min(0)
    return panel


def stat(title: str, description: str, targets: list[prometheus_b.Dataquery], unit: str = "short") -> stat_b.Panel:
    return (
        stat_b.Panel()
        .span(6)
        .height(8)
        .title(title)
        .description(description)
        .datasource(DS)
        .targets(list(targets))
        .unit(unit)
        .color_scheme(dashboard_b.FieldColor().mode(dashboard_m.FieldColorModeId.THRESHOLDS))
        .thresholds(
            dashboard_b.ThresholdsConfig()
            .mode(dashboard_m.ThresholdsMode.ABSOLUTE)
            .steps([dashboard_m.Threshold(value=None, color="blue")])
        )
        .overrides([])
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
    )


def dashed(name_regex: str, color: str) -> Override:
    """An override drawing the series whose name matches as a dashed line of a fixed colour (a limit line)."""
    return (
        Override()
        .matcher(dashboard_m.MatcherConfig(id_val="byRegexp", options=name_regex))
        .properties(
            [
                dashboard_m.DynamicConfigValue(
                    id_val="custom.lineStyle", value=common.LineStyle(fill="dash", dash=[10, 10])
                ),
                dashboard_m.DynamicConfigValue(
                    id_val="color",
                    value=dashboard_m.FieldColor(mode=dashboard_m.FieldColorModeId.FIXED, fixed_color=color),
                ),
            ]
        )
    )


def row(title: str) -> dashboard_b.Row:
    return dashboard_b.Row(title).collapsed(False)


def forgetting_vs_step() -> xychart_b.Panel:
    """XY chart: forgetting % (y) against the optimizer step (x), with the budget as a second series."""
    return (
        xychart_b.Panel()
        .span(12)
        .height(8)
        .title("Forgetting % against step (with budget)")
        .description(
            "Relative rise of the general held-out loss over the base model, in percent, at each evaluated step "
            "(forge_trainer_forgetting_percent against forge_trainer_step), and the ForgeJob's forgetting budget "
            "(spec.forgetting.budgetPercent). Select a single ForgeJob. Points above the budget line are over budget; "
            "an early rise that recovers is the 'stability gap'."
        )
        .datasource(DS)
        .targets(
            [
                target(f"max by ({BY_JOB}) (forge_trainer_step{{{SEL}}})", "step", "A"),
                target(f"max by ({BY_JOB}) (forge_trainer_forgetting_percent{{{SEL}}})", "forgetting %", "B"),
                target(f"max by ({BY_JOB}) ({BUDGET}{{{SEL}}})", "budget %", "C"),
            ]
        )
        .with_transformation(
            dashboard_m.DataTransformerConfig(id_val="joinByField", options={"byField": "Time", "mode": "outer"})
        )
        .unit("percent")
        .show(xychart_m.ScatterShow.POINTS)
        .point_size(common_b.ScaleDimensionConfig().fixed(5).min(1).max(20))
        .overrides([dashed("budget.*", "red")])
        .series_mapping(xychart_m.SeriesMapping.AUTO)
        .dims(xychart_b.XYDimensionConfig().frame(0).x("step"))
        .series([])
        .legend(legend())
        # The SDK always writes a tooltip sort; "none" is Grafana's default for a single-series tooltip.
        .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.SINGLE).sort(common.SortOrder.NONE))
    )


def panels() -> list[Item]:
    job = "{{forge_job}}"
    rank = "{{forge_job}} rank {{rank}}"
    return [
        row("Forgetting and domain gain"),
        forgetting_vs_step(),
        timeseries(
            "Forgetting % over time (with budget)",
            "forge_trainer_forgetting_percent: (general eval loss - base general loss) / base general loss, in "
            "percent; the dashed line is the ForgeJob's budget.",
            [
                target(f"max by ({BY_JOB}) (forge_trainer_forgetting_percent{{{SEL}}})", f"{job} forgetting %", "A"),
                target(f"max by ({BY_JOB}) ({BUDGET}{{{SEL}}})", f"{job} budget %", "B"),
            ],
            unit="percent",
            decimals=2,
            overrides=[dashed(".*budget.*", "red")],
        ),
        timeseries(
            "Domain gain %",
            "forge_trainer_domain_gain_percent: (base domain loss - domain eval loss) / base domain loss, in percent. "
            "Higher is better; a flat line means the run no longer learns the domain.",
            [target(f"max by ({BY_JOB}) (forge_trainer_domain_gain_percent{{{SEL}}})", job)],
            unit="percent",
            decimals=2,
        ),
        timeseries(
            "Forgetting % per general source",
            "forge_trainer_general_source_forgetting_percent: the forgetting of each eval.general source against the "
            "base model's loss on that source. Shows which general ability is being lost when the total moves.",
            [
                target(
                    f"max by ({BY_JOB}, source) (forge_trainer_general_source_forgetting_percent{{{SEL}}})",
                    f"{job} {{{{source}}}}",
                )
            ],
            unit="percent",
            decimals=2,
        ),
        timeseries(
            "KL(base || model) on general tokens",
            "forge_trainer_kl_base_nats: KL divergence from the base model's next-token distribution on the general "
            "held-out tokens, nats per token, over the base's top eval.klTopK tokens (a lower bound of the full KL). "
            "Rises when the model drifts from the base even where the general loss hides it.",
            [target(f"max by ({BY_JOB}) (forge_trainer_kl_base_nats{{{SEL}}})", job)],
            decimals=4,
            min_zero=True,
        ),
        timeseries(
            "Held-out loss: general and domain",
            "forge_trainer_eval_loss by set: mean loss on the fixed held-out general set (forgetting) and domain set "
            "(domain gain).",
            [target(f"max by ({BY_JOB}, set) (forge_trainer_eval_loss{{{SEL}}})", f"{job} {{{{set}}}}")],
            decimals=3,
        ),
        timeseries(
            "Training loss",
            "forge_trainer_loss: token-mean training loss of the last step over all ranks (mixed domain + general "
            "stream).",
            [target(f"max by ({BY_JOB}) (forge_trainer_loss{{{SEL}}})", job)],
            decimals=3,
        ),
        timeseries(
            "Realised data mix (domain share of tokens)",
            "forge_trainer_data_tokens: share of training tokens drawn from domain sources so far, in percent (the "
            "spec's data.domainPercent is the target).",
            [
                target(
                    f"100 * sum by ({BY_JOB}) (max by ({BY_JOB}, group, source) "
                    f'(forge_trainer_data_tokens{{{SEL}, group="domain"}})) / sum by ({BY_JOB}) '
                    f"(max by ({BY_JOB}, group, source) (forge_trainer_data_tokens{{{SEL}}}))",
                    f"{job} domain %",
                )
            ],
            unit="percent",
            decimals=1,
        ),
        row("Optimisation"),
        timeseries(
            "Learning rate",
            "forge_trainer_learning_rate: learning rate of the last step (warmup, then the schedule). Too high "
            "forgets fast; too low wastes compute.",
            [target(f"max by ({BY_JOB}) (forge_trainer_learning_rate{{{SEL}}})", job)],
            unit="sci",
        ),
        timeseries(
            "Gradient norm",
            "forge_trainer_grad_norm: global gradient norm before clipping. Spikes precede divergence.",
            [target(f"max by ({BY_JOB}) (forge_trainer_grad_norm{{{SEL}}})", job)],
            decimals=3,
        ),
        timeseries(
            "Progress (steps)",
            "forge_trainer_step against forge_trainer_total_steps.",
            [
                target(f"max by ({BY_JOB}) (forge_trainer_step{{{SEL}}})", f"{job} step", "A"),
                target(f"max by ({BY_JOB}) (forge_trainer_total_steps{{{SEL}}})", f"{job} total steps", "B"),
            ],
            overrides=[dashed(".*total steps", "text")],
        ),
        row("Throughput"),
        timeseries(
            "Tokens/s per rank",
            "forge_trainer_tokens_per_second of each trainer process. A rank well below the others is a straggler "
            "(slow node, throttled GPU, noisy neighbour).",
            [target(f"forge_trainer_tokens_per_second{{{SEL}}}", rank)],
            unit="short",
            min_zero=True,
        ),
        timeseries(
            "Tokens/s total",
            "Sum of forge_trainer_tokens_per_second over the ranks of each ForgeJob, and the same from the token "
            "counter (rate of forge_trainer_tokens_total).",
            [
                target(f"sum by ({BY_JOB}) (forge_trainer_tokens_per_second{{{SEL}}})", f"{job} (gauge)", "A"),
                target(
                    f"sum by ({BY_JOB}) (rate(forge_trainer_tokens_total{{{SEL}}}[$__rate_interval]))",
                    f"{job} (counter rate)",
                    "B",
                ),
            ],
            unit="short",
            min_zero=True,
        ),
        timeseries(
            "MFU",
            "forge_trainer_mfu_ratio: model FLOPs utilisation of each rank against its GPU's dense bf16 peak "
            "(FORGE_PEAK_TFLOPS overrides the peak). Around 0.35-0.45 is good for a 1B model on H100/H200.",
            [
                target(f"forge_trainer_mfu_ratio{{{SEL}}}", rank, "A"),
                target(f"avg by ({BY_JOB}) (forge_trainer_mfu_ratio{{{SEL}}})", f"{job} mean", "B"),
            ],
            unit="percentunit",
            min_zero=True,
        ),
        stat(
            "Tokens trained",
            "Training tokens processed so far over all ranks (forge_trainer_tokens_total).",
            [target(f"sum by ({BY_JOB}) (forge_trainer_tokens_total{{{SEL}}})", job)],
            unit="short",
        ),
        row("Stalls, stragglers and data"),
        timeseries(
            "Stalled ForgeJobs",
            f"{STALLED}: 1 while the operator holds the ForgeJob's Progressing condition False with reason Stalled "
            "(no progress within the limit of the run's phase; alert ForgeJobStalled). kubectl describe forgejob "
            "says which phase and since when.",
            [target(f"max by ({BY_JOB}) ({STALLED}{{{SEL}}})", f"{job} stalled")],
            decimals=0,
            min_zero=True,
        ),
        timeseries(
            "Seconds without a step",
            "Time since forge_trainer_step last moved, at one-minute resolution (it reads 0 while steps come at least "
            "once a minute). A line climbing steadily is a hang: a collective, the data loader or storage.",
            [
                target(
                    f"time() - max by ({BY_JOB}) (max_over_time((timestamp(changes(forge_trainer_step{{{SEL}}}[1m]) "
                    "> 0))[3h:30s]))",
                    job,
                )
            ],
            unit="s",
            min_zero=True,
        ),
        timeseries(
            "Step time per rank",
            f"{RANK_STEP}: each rank's recent median step compute time, the job's median rank, and 1.3x that median "
            "(dashed): a rank above the dashed line for 15 minutes is a straggler (alert ForgeStragglerRank). "
            f"{STRAGGLER} is 1 for a rank the trainer names a straggler.",
            [
                target(f"max by ({BY_JOB}, rank) ({RANK_STEP}{{{SEL}}})", rank, "A"),
                target(f"quantile by ({BY_JOB}) (0.5, {RANK_STEP}{{{SEL}}})", f"{job} median rank", "B"),
                target(f"1.3 * quantile by ({BY_JOB}) (0.5, {RANK_STEP}{{{SEL}}})", f"{job} straggler line", "C"),
                target(f"max by ({BY_JOB}, rank) ({STRAGGLER}{{{SEL}}})", f"{rank} named straggler", "D"),
            ],
            unit="s",
            overrides=[dashed(".*straggler line", "orange")],
            min_zero=True,
        ),
        timeseries(
            "Data wait per rank",
            f"{DATA_WAIT}: share of each rank's step time spent waiting for its next batch. Above 20% for 15 minutes "
            "(alert ForgeDataStarved) the GPUs wait on storage, the loader or tokenisation.",
            [target(f"max by ({BY_JOB}, rank) ({DATA_WAIT}{{{SEL}}})", rank)],
            unit="percentunit",
            min_zero=True,
        ),
        row("Checkpoints"),
        timeseries(
            "Checkpoints saved",
            "forge_trainer_checkpoints_saved_total: complete checkpoints written by each ForgeJob; "
            f"{REPORTED_CHECKPOINTS}: checkpoints recorded in the ForgeJob's status.",
            [
                target(f"max by ({BY_JOB}) (forge_trainer_checkpoints_saved_total{{{SEL}}})", f"{job} saved", "A"),
                target(f"max by ({BY_JOB}) ({REPORTED_CHECKPOINTS}{{{SEL}}})", f"{job} in status", "B"),
            ],
            decimals=0,
            min_zero=True,
        ),
        timeseries(
            "Checkpoint selected (step)",
            f"{SELECTED_STEP}: optimizer step of the checkpoint the ForgeJob's selection policy chose "
            "(status.selected.step); it moves when a better checkpoint within the forgetting budget arrives.",
            [target(f"max by ({BY_JOB}) ({SELECTED_STEP}{{{SEL}}})", f"{job} selected step")],
            decimals=0,
            min_zero=True,
        ),
        row("Jobs and operator"),
        timeseries(
            "ForgeJobs by state",
            "forge_forgejobs: ForgeJobs seen by the operator in each state (Pending, Running, Succeeded, "
            "EarlyStopped, Failed, ...).",
            [target("sum by (state) (forge_forgejobs)", "{{state}}")],
            decimals=0,
            stack=True,
            min_zero=True,
        ),
        timeseries(
            "Reconcile latency (p50, p95)",
            "forge_reconcile_duration_seconds: duration of the operator's handler runs, by handler.",
            [
                target(
                    "histogram_quantile(0.95, sum by (le, handler) "
                    "(rate(forge_reconcile_duration_seconds_bucket[$__rate_interval])))",
                    "p95 {{handler}}",
                    "A",
                ),
                target(
                    "histogram_quantile(0.5, sum by (le, handler) "
                    "(rate(forge_reconcile_duration_seconds_bucket[$__rate_interval])))",
                    "p50 {{handler}}",
                    "B",
                ),
            ],
            unit="s",
            min_zero=True,
        ),
        timeseries(
            "Reconcile errors",
            "forge_reconcile_errors_total: handler errors and refusals per second, by kind (invalid_spec, "
            "spec_change_refused, child_conflict, conflict, api, internal).",
            [target("sum by (kind) (rate(forge_reconcile_errors_total[$__rate_interval]))", "{{kind}}")],
            unit="reqps",
            min_zero=True,
        ),
        timeseries(
            "Operator writes",
            "forge_children_created_total (by kind) and forge_status_patches_total (by handler), per second.",
            [
                target("sum by (kind) (rate(forge_children_created_total[$__rate_interval]))", "created {{kind}}", "A"),
                target(
                    "sum by (handler) (rate(forge_status_patches_total[$__rate_interval]))",
                    "status patch {{handler}}",
                    "B",
                ),
            ],
            unit="reqps",
            min_zero=True,
        ),
    ]


def variable(name: str, label: str, query: str, multi: bool = True) -> dashboard_b.QueryVariable:
    return (
        dashboard_b.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query({"query": query, "refId": f"{name}-var"})
        .refresh(dashboard_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_m.VariableSort.ALPHABETICAL_ASC)
        .multi(multi)
        .include_all(True)
        .all_value(".*")
        .current(dashboard_m.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .hide(dashboard_m.VariableHide.DONT_HIDE)
    )


def builder() -> dashboard_b.Dashboard:
    """The dashboard. The SDK lays the panels out: rows span the width, the others (12 columns wide, 6 for a stat,
    8 high) flow left to right and wrap at 24 columns."""
    dash = (
        dashboard_b.Dashboard("Forge")
        .uid("forge-overview")
        .description(
            "Forge ForgeJobs: forgetting, domain gain, losses, throughput, stalls and stragglers, checkpoints, "
            "operator health."
        )
        .tags(["forge", "training", "kubeflow"])
        .timezone("browser")
        .editable()
        .tooltip(dashboard_m.DashboardCursorSync.CROSSHAIR)
        .version(1)
        .refresh("30s")
        .time("now-6h", "now")
        .annotations([])
        .links([])
        .with_variable(dashboard_b.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(variable("namespace", "Namespace", "label_values(forge_trainer_step, namespace)"))
        .with_variable(
            variable("forgejob", "ForgeJob", 'label_values(forge_trainer_step{namespace=~"$namespace"}, forge_job)')
        )
    )
    for pid, item in enumerate(panels(), start=1):
        if isinstance(item, dashboard_b.Row):
            dash.with_row(item.id(pid))
        else:
            dash.with_panel(item.id(pid))
    return dash


def dashboard() -> dict[str, Any]:
    model = builder().build()
    model.schema_version = SCHEMA_VERSION
    doc: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    # Kept as plain JSON: the SDK's variable model (Grafana 10.1 schema) has no `definition` (the query text Grafana
    # shows in the variable list, and that tests/chart/test_dashboard.py reads), and its DatasourceVariable builder
    # no `refresh`.
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            var["definition"] = var["query"]["query"]
        elif var["type"] == "datasource":
            var["refresh"] = dashboard_m.VariableRefresh.ON_DASHBOARD_LOAD.value
    return doc


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def panel_table() -> str:
    """The Markdown table of panels and their PromQL, for docs/monitoring.md."""
    rows = ["| Panel | PromQL |", "| --- | --- |"]
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            rows.append(f"| **{panel['title']}** | |")
            continue
        exprs = "<br>".join(f"`{t['expr']}`".replace("|", "\\|") for t in panel["targets"])
        rows.append(f"| {panel['title']} | {exprs} |")
    return "\n".join(rows) + "\n"


def with_panel_table(doc: str) -> str | None:
    before, start, rest = doc.partition(DOC_START)
    _, end, after = rest.partition(DOC_END)
    if not start or not end:
        return None
    return f"{before}{DOC_START}\n{panel_table()}{DOC_END}{after}"


def main() -> int:
    text = render()
    doc = DOC.read_text() if DOC.is_file() else ""
    updated = with_panel_table(doc)
    if updated is None:
        print(f"{DOC}: markers {DOC_START} ... {DOC_END} not found", file=sys.stderr)
        return 1
    if "--check" in sys.argv[1:]:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run .venv/bin/python scripts/build-dashboard.py", file=sys.stderr)
            return 1
        if updated != doc:
            print(
                f"{DOC}: the panel table is out of date: run .venv/bin/python scripts/build-dashboard.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    DOC.write_text(updated)
    print(f"wrote {OUT} and the panel table of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
