"""docs/monitoring.md stays true: its values table, its metric list and its alert rules."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.chart.helm import REPO_ROOT
from tests.chart.test_dashboard import PENDING_METRICS, exported_metric_names

DOC = REPO_ROOT / "docs" / "monitoring.md"


def test_values_table_is_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "values-table.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| `operator.watchNamespaces` |" in DOC.read_text()


def test_every_exported_metric_is_documented() -> None:
    doc = DOC.read_text()
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported_metric_names()}
    missing = sorted(f for f in families if f not in doc)
    assert not missing, f"docs/monitoring.md does not mention {missing}"


def alert_rules() -> str:
    doc = DOC.read_text()
    block = doc.split("<!-- alerts:start -->", 1)[1].split("<!-- alerts:end -->", 1)[0]
    m = re.search(r"```yaml\n(.*?)```", block, re.DOTALL)
    assert m, "no yaml block between the alerts markers"
    return m.group(1)


def test_alert_rules_are_valid(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    rules = tmp_path / "forge-alerts.yml"
    rules.write_text(alert_rules())
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_rules_use_exported_metrics() -> None:
    known = exported_metric_names() | set(PENDING_METRICS) | {"up"}
    for group in yaml.safe_load(alert_rules())["groups"]:
        for rule in group["rules"]:
            used = set(re.findall(r"\b(forge_[a-z0-9_]+)", rule["expr"])) - {"forge_job"}
            assert used, rule["alert"]
            assert used <= known, f"{rule['alert']}: {sorted(used - known)} not exported"


def test_the_chart_alert_file_is_the_documented_one() -> None:
    shipped = (Path(__file__).resolve().parents[2] / "charts" / "forge" / "files" / "alerts.yaml").read_text()
    assert yaml.safe_load(shipped) == yaml.safe_load(alert_rules())
