"""A real Prometheus server (Debian's package) on loopback, scraping static targets, and its HTTP query API."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, start_http_server

from forge_dev.controlplane import free_port
from forge_dev.services import http_ok, managed_process


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None)
    if found is None:
        raise AssertionError("prometheus not found: `make system-packages` installs Debian's prometheus")
    return found


@dataclass
class Prometheus:
    url: str
    log_path: Path

    def api(self, path: str, params: Mapping[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            doc = json.loads(response.read())
        if doc.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {doc}")
        return doc["data"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        data = self.api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step})
        result: list[dict[str, Any]] = data["result"]
        return result

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", {"query": expr})["result"]
        return result

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        result: list[dict[str, str]] = self.api("series", {"match[]": match, "start": str(start), "end": str(end)})
        return result

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """``{alert name: [alert]}`` of the pending and firing alerts (each with ``labels`` and ``state``)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in self.api("alerts", {})["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.api("rules", {})["groups"]
        return groups

    def targets_up(self) -> dict[str, float]:
        """``{job: value of up}`` for every target."""
        return {r["metric"]["job"]: float(r["value"][1]) for r in self.query("up")}


@contextmanager
def prometheus(
    workdir: Path,
    targets: Mapping[str, str],
    scrape_interval: str = "500ms",
    rule_files: Sequence[Path] = (),
    evaluation_interval: str = "5s",
) -> Iterator[Prometheus]:
    """Run Prometheus scraping ``{job name: host:port}`` and evaluating ``rule_files`` every ``evaluation_interval``;
    stopped (and its data removed) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    argv = [
        prometheus_binary(),
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    server = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:
        with managed_process("prometheus", argv, log_path, lambda: http_ok(f"{server.url}/-/ready"), timeout_s=30):
            yield server
    finally:
        shutil.rmtree(workdir / "data", ignore_errors=True)


@contextmanager
def served(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` on a loopback /metrics endpoint; ``host:port``."""
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
