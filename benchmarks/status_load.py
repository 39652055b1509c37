"""Status load benchmark: N running ForgeJobs whose simulated trainers report status at the default cadence.

A real local control plane and the real operator. Each ForgeJob's PyTorchJob is marked Running (as the training
operator would), then every job gets a simulated trainer: the trainer's own ``StatusReporter`` (default
``report.minIntervalSeconds``, 30 s) fed with a progress patch every step, an evaluation every ``--eval-every``
steps and a checkpoint every ``--checkpoint-every`` steps, as the real step loop does. Job phases are staggered.
Over the measured window it prints: the API server's write rate (its own apiserver_request_total, all writers) and
the trainers' and the operator's share, the operator's CPU seconds and RSS, and the largest ForgeJob's size. A
script, not a test:

    .venv/bin/python benchmarks/status_load.py [--jobs 500] [--duration 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config

from forge_dev.controlplane import ControlPlane, free_port
from forge_dev.crds import install_crds, minimal_pytorchjob_crd_path
from forge_trainer.config import ReportSettings
from forge_trainer.report import MERGE_PATCH, StatusReporter, checkpoint_entry, latest_status, progress_status
from forge_trainer.report import status_patch as make_patch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from operator_scale import cpu_seconds, forgejob, proc_status

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBEFLOW_CRD = REPO_ROOT.parent / "shared" / "fixtures" / "kubeflow.org_pytorchjobs.yaml"
NAMESPACE = "bench"
WRITE_VERBS = ("CREATE", "PATCH", "UPDATE", "DELETE", "APPLY", "POST", "PUT")


def apiserver_writes(api: client.ApiClient) -> float:
    """Every write the API server has served so far (its own counter, all clients)."""
    method, url, headers, _, _ = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response = api.call_api(method, url, header_params=headers)
    total = 0.0
    for line in response.read().decode().splitlines():
        if line.startswith("apiserver_request_total{"):
            verb = re.search(r'verb="([A-Z]+)"', line)
            if verb and verb.group(1) in WRITE_VERBS:
                total += float(line.rsplit(" ", 1)[1])
    return total


def operator_writes(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("forge_api_requests_total{") and re.search(r'verb="(create|patch|update|delete)"', line):
            total += float(line.rsplit(" ", 1)[1])
    return total


class FakeEval:
    """What the trainer's evaluation returns, as far as status reporting reads it."""

    def __init__(self, step: int) -> None:
        self.domain_loss = 2.0 - step / 10_000
        self.general_loss = 1.8 + step / 50_000
        self.forgetting_percent = step / 500
        self.domain_gain_percent = step / 100
        self.kl_base = step / 100_000
        self.forgetting_stderr_percent = 0.1
        self.general_source_losses = None
        self.general_source_forgetting = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--duration", type=float, default=300.0, help="measured seconds of reporting")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="simulated seconds per optimizer step")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    parser.add_argument(
        "--interval", type=float, default=ReportSettings().min_interval_seconds, help="report.minIntervalSeconds"
    )
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    crd_files = [
        REPO_ROOT / "crds" / "forgejob.yaml",
        KUBEFLOW_CRD if KUBEFLOW_CRD.is_file() else minimal_pytorchjob_crd_path(),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="forge-status-load-"))
    with ControlPlane() as plane:
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        api.configuration.connection_pool_maxsize = 32
        install_crds(api, crd_files)
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        health_port, metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(plane.kubeconfig),
            "FORGE_TRAINER_IMAGE": "registry.example/forge-trainer:bench",
            "FORGE_HEALTH_PORT": str(health_port),
            "FORGE_METRICS_PORT": str(metrics_port),
            "FORGE_LOG_LEVEL": "WARNING",
        }
        log_path = workdir / "operator.log"
        with log_path.open("wb") as log:
            operator = subprocess.Popen(
                [str(Path(sys.executable).with_name("forge-operator"))],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        reporters: list[StatusReporter] = []
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or operator.poll() is not None:
                        raise SystemExit(f"operator did not start; see {log_path}") from None
                    time.sleep(0.1)
            names = [f"job-{index:04d}" for index in range(args.jobs)]
            with ThreadPoolExecutor(args.clients) as pool:
                list(
                    pool.map(
                        lambda n: custom.create_namespaced_custom_object(
                            "forge.dev", "v1alpha1", NAMESPACE, "forgejobs", forgejob(n)
                        ),
                        names,
                    )
                )

            def count(predicate: Any) -> int:
                items = custom.list_namespaced_custom_object("forge.dev", "v1alpha1", NAMESPACE, "forgejobs")["items"]
                return sum(1 for item in items if predicate(item.get("status") or {}))

            setup_deadline = time.monotonic() + 900
            while count(lambda s: s.get("pytorchJob")) < args.jobs:
                if time.monotonic() > setup_deadline:
                    raise SystemExit(f"not every ForgeJob accepted; see {log_path}")
                time.sleep(1)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            running = [
                {"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": t, "lastTransitionTime": now}
                for t in ("Created", "Running")
            ]

            def mark_running(name: str) -> None:
                job = custom.get_namespaced_custom_object("kubeflow.org", "v1", NAMESPACE, "pytorchjobs", name)
                job["status"] = {"conditions": running}
                custom.replace_namespaced_custom_object_status(
                    "kubeflow.org", "v1", NAMESPACE, "pytorchjobs", name, job
                )

            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(mark_running, names))
            while count(lambda s: s.get("state") == "Running") < args.jobs:
                if time.monotonic() > setup_deadline:
                    raise SystemExit(f"not every ForgeJob Running; see {log_path}")
                time.sleep(1)

            def patcher(name: str) -> Any:
                def patch(body: dict[str, Any]) -> None:
                    custom.patch_namespaced_custom_object_status(
                        "forge.dev", "v1alpha1", NAMESPACE, "forgejobs", name, body, _content_type=MERGE_PATCH
                    )

                return patch

            reporters = [StatusReporter(lambda n=n: patcher(n), args.interval) for n in names]
            rng = random.Random(0)
            offsets = [rng.randrange(args.checkpoint_every) for _ in names]
            checkpoints: list[list[dict[str, Any]]] = [[] for _ in names]
            total_steps = 100_000
            time.sleep(2)  # the operator settles after the Running wave
            writes_before = apiserver_writes(api)
            operator_before = operator_writes(metrics_port)
            cpu_before = cpu_seconds(operator.pid)
            started = time.monotonic()
            tick = 0
            while time.monotonic() - started < args.duration:
                for index, reporter in enumerate(reporters):
                    step = offsets[index] + tick
                    latest_eval = FakeEval(step - step % args.eval_every)
                    fields: dict[str, Any] = {
                        "progress": progress_status(step, total_steps, step * 262_144, None),
                        "latest": latest_status(latest_eval, 5000.0, 0.4, 2e-5, 75.0),  # type: ignore[arg-type]
                    }
                    if step % args.checkpoint_every == 0:
                        uri = f"s3://acme/forge/{names[index]}/step-{step:08d}/"
                        checkpoints[index].append(checkpoint_entry(step, uri, latest_eval))  # type: ignore[arg-type]
                        fields["checkpoints"] = list(checkpoints[index])
                    reporter.submit(make_patch(**fields))
                tick += 1
                time.sleep(max(0.0, started + tick * args.step_seconds - time.monotonic()))
            elapsed = time.monotonic() - started
            writes = apiserver_writes(api) - writes_before
            operator_sent = operator_writes(metrics_port) - operator_before
            cpu = cpu_seconds(operator.pid) - cpu_before
            rss_kib, peak_kib = proc_status(operator.pid, "VmRSS"), proc_status(operator.pid, "VmHWM")
            trainer_sent = sum(r.sent for r in reporters)
            trainer_errors = sum(r.errors for r in reporters)
            items = custom.list_namespaced_custom_object("forge.dev", "v1alpha1", NAMESPACE, "forgejobs")["items"]
            largest = max(len(json.dumps(item)) for item in items)
            load = os.getloadavg()
        finally:
            for reporter in reporters:
                reporter.close(timeout=0.1)
            if operator.poll() is None:
                operator.send_signal(signal.SIGTERM)
                try:
                    operator.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()

    print(f"ForgeJobs (Running)                 : {args.jobs}, report.minIntervalSeconds {args.interval:g} s")
    print(
        f"simulated trainers                  : 1 step / {args.step_seconds:g} s, evaluation every {args.eval_every} "
        f"steps, checkpoint every {args.checkpoint_every} steps, measured {elapsed:.0f} s"
    )
    print(f"API server writes (all clients)     : {writes / elapsed:.1f} /s ({writes:.0f})")
    print(
        f"  trainer status patches            : {trainer_sent / elapsed:.1f} /s ({trainer_sent}, {trainer_errors} err)"
    )
    print(f"  operator writes                   : {operator_sent / elapsed:.1f} /s ({operator_sent:.0f})")
    print(
        f"operator CPU                        : {cpu:.1f} s over {elapsed:.0f} s ({100 * cpu / elapsed:.0f}% of a core)"
    )
    print(f"operator RSS                        : {rss_kib / 1024:.0f} MiB now, peak {peak_kib / 1024:.0f} MiB")
    print(f"largest ForgeJob (JSON)             : {largest / 1024:.1f} KiB")
    print(f"load average (1/5/15 min)           : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"operator log                        : {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
