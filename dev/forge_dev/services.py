"""Local services for the demo and the end-to-end tests: an S3 server, the operator, Prometheus.

Each is a real program started as a subprocess on free loopback ports, waited for until it answers, and stopped
(with its whole process group) when the context exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from forge_dev.controlplane import free_port

S3_ACCESS_KEY = "forge-demo"
S3_SECRET_KEY = "forge-demo-secret"  # the loopback S3 server accepts any key; these are not secrets


class ServiceError(RuntimeError):
    """A local service did not start."""


def venv_bin(name: str) -> str:
    """A console script installed beside this Python (the project's virtual environment)."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name} not found beside {sys.executable} or on PATH: run `make venv`")
    return found


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


@contextmanager
def managed_process(
    name: str,
    argv: list[str],
    log_path: Path,
    ready: Callable[[], bool],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in its own process group until the block ends; wait until ``ready()`` before yielding."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env or os.environ), start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if process.poll() is not None:
                raise ServiceError(f"{name} exited with {process.returncode}; log: {log_path}\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} not ready after {timeout_s:.0f} s; log: {log_path}\n{_tail(log_path)}")
            time.sleep(0.1)
        yield process
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server on loopback (moto's server)."""

    endpoint: str

    def client_env(self) -> dict[str, str]:
        """The variables boto3 needs to talk to it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@contextmanager
def s3_server(log_path: Path) -> Iterator[S3Server]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with managed_process("moto_server", argv, log_path, lambda: http_ok(f"{endpoint}/moto-api/")):
        yield S3Server(endpoint)


@dataclass(frozen=True)
class OperatorService:
    health_port: int
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@contextmanager
def operator_process(
    kubeconfig: Path, log_path: Path, namespaces: list[str], extra_env: Mapping[str, str] | None = None
) -> Iterator[OperatorService]:
    """The real ``forge-operator`` command, watching ``namespaces`` of the cluster behind ``kubeconfig``."""
    service = OperatorService(health_port=free_port(), metrics_port=free_port())
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "FORGE_NAMESPACES": ",".join(namespaces),
        "FORGE_TRAINER_IMAGE": "forge-trainer:dev",
        "FORGE_HEALTH_PORT": str(service.health_port),
        "FORGE_METRICS_PORT": str(service.metrics_port),
        **(extra_env or {}),
    }
    ready = f"http://127.0.0.1:{service.health_port}/healthz"
    with managed_process("forge-operator", [venv_bin("forge-operator")], log_path, lambda: http_ok(ready), env):
        yield service


@dataclass(frozen=True)
class PrometheusServer:
    url: str


@contextmanager
def prometheus_server(workdir: Path, file_sd: Path, scrape_interval: str = "1s") -> Iterator[PrometheusServer]:
    """Debian's Prometheus scraping the targets listed in the file ``file_sd`` (JSON, re-read every second)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ServiceError("prometheus not found: run `make system-packages` (Debian package prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": "forge", "file_sd_configs": [{"files": [str(file_sd)], "refresh_interval": "1s"}]}
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with managed_process("prometheus", argv, workdir / "prometheus.log", lambda: http_ok(f"{url}/-/ready")):
        yield PrometheusServer(url)
