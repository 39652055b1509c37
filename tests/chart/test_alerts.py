"""The alert rules the chart ships (charts/forge/files/alerts.yaml): promtool's unit tests (tests/chart/alerts.test.yml)
cover every alert, the PrometheusRule renders them only where the Prometheus operator's API is served, and a drill
in which a real Prometheus evaluates them against metrics this process serves and changes."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from tests.chart.helm import (
    CHART,
    MONITORING_API_VERSIONS,
    REPO_ROOT,
    by_kind,
    helm,
    one,
    template,
    value_args,
    wait_for,
)
from tests.chart.prometheus import Prometheus, prometheus, served

ALERTS = CHART / "files" / "alerts.yaml"
UNIT_TESTS = Path(__file__).with_name("alerts.test.yml")
SCHEMA = CHART / "values.schema.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool") or "/usr/bin/promtool"
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False, timeout=120)


def shipped_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    return groups


def alert_names() -> list[str]:
    return [rule["alert"] for group in shipped_groups() for rule in group["rules"]]


# --- promtool unit tests -----------------------------------------------------------------------------------------


def test_promtool_unit_tests_pass() -> None:
    proc = promtool("test", "rules", str(UNIT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_fires_and_resolves_in_the_unit_tests() -> None:
    """Each alert has a test where it fires and, later in the same test, does not; the healthy test lists them all."""
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fires_then_resolves: set[str] = set()
    for test in tests:
        firing: dict[str, float] = {}
        for check in sorted(test["alert_rule_test"], key=lambda c: minutes(c["eval_time"])):
            name, at = check["alertname"], minutes(check["eval_time"])
            if check["exp_alerts"]:
                firing.setdefault(name, at)
            elif name in firing and at > firing[name]:
                fires_then_resolves.add(name)
    assert fires_then_resolves == set(alert_names())
    healthy = [t for t in tests if t["name"].startswith("a healthy")]
    assert len(healthy) == 1
    quiet = {c["alertname"] for c in healthy[0]["alert_rule_test"] if not c["exp_alerts"]}
    assert quiet == set(alert_names())
    assert all(not c["exp_alerts"] for c in healthy[0]["alert_rule_test"])


def minutes(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+)([hms])", duration):
        total += int(amount) * {"h": 60.0, "m": 1.0, "s": 1 / 60}[unit]
    return total


def test_every_alert_has_a_runbook_row() -> None:
    runbook = (REPO_ROOT / "docs" / "runbook.md").read_text()
    rows = re.findall(r"^\| `(Forge[A-Za-z]+)` \((critical|warning|info)\) \|", runbook, re.MULTILINE)
    shipped = {r["alert"]: r["labels"]["severity"] for group in shipped_groups() for r in group["rules"]}
    assert dict(rows) == shipped


# --- the PrometheusRule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enabled", "api_versions", "rendered"),
    [
        (True, MONITORING_API_VERSIONS, True),
        (True, ("monitoring.coreos.com/v1/ServiceMonitor",), False),  # the operator without the PrometheusRule kind
        (True, (), False),
        (False, MONITORING_API_VERSIONS, False),
    ],
    ids=["enabled-with-api", "enabled-without-the-kind", "enabled-without-api", "disabled-with-api"],
)
def test_prometheus_rule_needs_the_value_and_the_api(
    enabled: bool, api_versions: tuple[str, ...], rendered: bool, tmp_path: Path
) -> None:
    values = {"metrics": {"prometheusRule": {"enabled": enabled}}}
    objects = template(tmp_path, values, api_versions=api_versions)
    assert len(by_kind(objects, "PrometheusRule")) == (1 if rendered else 0)


def test_prometheus_rule_is_the_shipped_rule_file(tmp_path: Path) -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}}
    rule = one(
        template(tmp_path, values, namespace="monitoring", api_versions=MONITORING_API_VERSIONS), "PrometheusRule"
    )
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "forge"
    assert rule["spec"]["groups"] == shipped_groups()
    rendered = tmp_path / "rendered-rules.yml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = promtool("check", "rules", str(rendered))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in proc.stdout


def test_prometheus_rule_severity_overrides_and_disabled_alerts(tmp_path: Path) -> None:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "severities": {"ForgeLowMFU": "warning", "ForgeJobStalled": "page"},
                "disabled": ["ForgeOperatorSlowReconcile"],
            }
        }
    }
    rule = one(template(tmp_path, values, api_versions=MONITORING_API_VERSIONS), "PrometheusRule")
    rules = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(rules) == set(alert_names()) - {"ForgeOperatorSlowReconcile"}
    assert rules["ForgeLowMFU"]["labels"] == {"severity": "warning"}
    assert rules["ForgeJobStalled"]["labels"] == {"severity": "page"}
    shipped = {r["alert"]: r for group in shipped_groups() for r in group["rules"]}
    assert rules["ForgeDataStarved"] == shipped["ForgeDataStarved"]


def test_values_schema_knows_every_alert_name(tmp_path: Path) -> None:
    """severities and disabled take alert names of the rule file: the schema lists them, and refuses others."""
    import json

    props = json.loads(SCHEMA.read_text())["properties"]["metrics"]["properties"]["prometheusRule"]["properties"]
    assert props["severities"]["propertyNames"]["enum"] == alert_names()
    assert props["disabled"]["items"]["enum"] == alert_names()
    bad = {"metrics": {"prometheusRule": {"enabled": True, "severities": {"ForgeTrainingStaled": "info"}}}}
    proc = helm("template", "forge", str(CHART), *value_args(bad, tmp_path), check=False)
    assert proc.returncode != 0 and "ForgeTrainingStaled" in proc.stderr, proc.stderr


# --- a drill against a real Prometheus ---------------------------------------------------------------------------


def faster(duration: str) -> str:
    """A duration with minutes read as seconds (and hours as minutes): 15m -> 15s, 1h:1m -> 60s:1s."""
    return re.sub(r"(\d+)([mh])\b", lambda m: f"{int(m.group(1)) * (60 if m.group(2) == 'h' else 1)}s", duration)


def scaled_rules() -> dict[str, Any]:
    """The shipped rules with every `for:`, range window, subquery and offset 60 times shorter, so that a drill of
    seconds goes through what a real run goes through in minutes. Nothing else changes."""
    groups = shipped_groups()
    for group in groups:
        for rule in group["rules"]:
            expr = re.sub(r"\[([^\]]+)\]", lambda m: f"[{faster(m.group(1))}]", rule["expr"])
            rule["expr"] = re.sub(r"\boffset (\w+)", lambda m: f"offset {faster(m.group(1))}", expr)
            if "for" in rule:
                rule["for"] = faster(rule["for"])
    return {"groups": groups}


def test_scaled_rules_change_only_durations() -> None:
    scaled = {r["alert"]: r for g in scaled_rules()["groups"] for r in g["rules"]}
    assert scaled["ForgeTrainingStalled"]["for"] == "5s"
    assert "changes(forge_trainer_step[15s])" in scaled["ForgeTrainingStalled"]["expr"]
    assert "(forge_trainer_step offset 15s)" in scaled["ForgeTrainingStalled"]["expr"]
    assert (
        "[1h:1m]" not in scaled["ForgeThroughputDrop"]["expr"] and "[60s:1s]" in scaled["ForgeThroughputDrop"]["expr"]
    )
    shipped = {r["alert"]: r for g in shipped_groups() for r in g["rules"]}
    for name, rule in scaled.items():
        digits = re.sub(r"\[[^\]]*\]|offset \w+", "", rule["expr"])
        assert digits == re.sub(r"\[[^\]]*\]|offset \w+", "", shipped[name]["expr"]), name


class Stepper:
    """A trainer rank's step gauge that moves (one step every 0.2 s) until paused: a run that trains, then hangs."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.moving = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            if self.moving.is_set():
                self.gauge.inc()


def state(prom: Prometheus, alert: str, **labels: str) -> str:
    """``pending``, ``firing`` or ``inactive`` for the alert with these labels."""
    for found in prom.alerts().get(alert, []):
        if labels.items() <= found["labels"].items():
            return str(found["state"])
    return "inactive"


def wait_state(prom: Prometheus, alert: str, wanted: str, timeout: float = 90, **labels: str) -> None:
    wait_for(f"{alert} {labels} {wanted}", lambda: state(prom, alert, **labels) == wanted, timeout=timeout)


@pytest.mark.slow
def test_alert_drill_with_a_real_prometheus(tmp_path: Path) -> None:
    from forge_operator import metrics as operator_metrics
    from forge_trainer.metrics import create_metrics

    ns, job = "ml", "drill"
    trainer = create_metrics(job, ns, 0)
    step = trainer.step.labels(**trainer.labels)
    trainer.total_steps.labels(**trainer.labels).set(1_000_000)
    trainer.forgetting_budget.labels(**trainer.labels).set(2)
    forgetting = trainer.forgetting.labels(**trainer.labels)
    forgetting.set(0.5)
    # The stall verdict is the operator's liveness handler's to set: served here from a test registry under its
    # exported name and labels, so that the drill can turn it on and off.
    pending = CollectorRegistry()
    stalled = Gauge("forge_forgejob_stalled", "test", ["namespace", "forge_job"], registry=pending)
    stalled.labels(namespace=ns, forge_job=job).set(0)
    data_wait = trainer.data_wait.labels(**trainer.labels)
    data_wait.set(0.05)
    operator_metrics.record_state(ns, job, "Running")

    rules = tmp_path / "forge-alerts-scaled.yml"
    rules.write_text(yaml.safe_dump(scaled_rules()))
    stepper = Stepper(step)
    stepper.moving.set()
    stepper.thread.start()
    try:
        with (
            served(trainer.registry) as trainer_target,
            served(operator_metrics.REGISTRY) as operator_target,
            served(pending) as pending_target,
            prometheus(
                tmp_path / "prometheus",
                {"forge-trainer": trainer_target, "forge-operator": operator_target, "forge-pending": pending_target},
                rule_files=[rules],
                evaluation_interval="1s",
            ) as prom,
        ):
            # Healthy: once the rules have been evaluated on scraped data, nothing is pending or firing.
            wait_for("every target scraped", lambda: set(prom.targets_up().values()) == {1.0}, timeout=60)
            evaluations: set[str] = set()

            def evaluated_on_scraped_data() -> bool:
                if prom.query("changes(forge_trainer_step[2s]) > 0") and prom.query("forge_forgejobs"):
                    evaluations.update(g["lastEvaluation"] for g in prom.rule_groups() if g["name"] == "forge")
                return len(evaluations) > 3

            wait_for("the rules evaluated on scraped data", evaluated_on_scraped_data, timeout=60)
            assert prom.alerts() == {}

            # The forgetting over budget, a failed ForgeJob, a data-starved rank: pending (where `for:` says so),
            # firing, and back to inactive once the cause is gone.
            forgetting.set(3)
            data_wait.set(0.5)
            operator_metrics.record_state(ns, "other", "Failed")
            wait_state(prom, "ForgeForgettingOverBudget", "pending", namespace=ns, forge_job=job)
            wait_state(prom, "ForgeDataStarved", "pending", namespace=ns, forge_job=job, rank="0")
            wait_state(prom, "ForgeJobFailed", "firing", state="Failed")
            wait_state(prom, "ForgeForgettingOverBudget", "firing", namespace=ns, forge_job=job)
            wait_state(prom, "ForgeDataStarved", "firing", namespace=ns, forge_job=job, rank="0")
            forgetting.set(1)
            data_wait.set(0.05)
            wait_state(prom, "ForgeForgettingOverBudget", "inactive", namespace=ns, forge_job=job)
            wait_state(prom, "ForgeDataStarved", "inactive", namespace=ns, forge_job=job, rank="0")
            wait_state(prom, "ForgeJobFailed", "inactive", state="Failed")

            # A hang: the steps stop. Prometheus' own stall alert fires; once the operator reports the stall, its
            # alert fires instead; when the steps move again and the operator clears the stall, both resolve.
            stepper.moving.clear()
            wait_state(prom, "ForgeTrainingStalled", "firing", namespace=ns, forge_job=job)
            stalled.labels(namespace=ns, forge_job=job).set(1)
            wait_state(prom, "ForgeJobStalled", "firing", namespace=ns, forge_job=job)
            wait_state(prom, "ForgeTrainingStalled", "inactive", namespace=ns, forge_job=job)
            stepper.moving.set()
            wait_for("the steps moving again", lambda: prom.query("changes(forge_trainer_step[2s]) > 0"), timeout=30)
            stalled.labels(namespace=ns, forge_job=job).set(0)
            wait_state(prom, "ForgeJobStalled", "inactive", namespace=ns, forge_job=job)
            wait_for("no alert pending or firing", lambda: prom.alerts() == {}, timeout=60)
    finally:
        stepper.stopped.set()
        stepper.thread.join(timeout=5)
        operator_metrics.forget(ns, job)
        operator_metrics.forget(ns, "other")
