"""Operator scale benchmark: N ForgeJobs applied at once to a real local control plane.

Prints: time until every PyTorchJob exists (and every ForgeJob is Accepted), apply -> PyTorchJob latency per job
(p50/p95), reconcile-handler latency p50/p95 (from the operator's own histogram), the time to mirror a Running
condition into every ForgeJob, and the operator's peak RSS and CPU time. A script, not a test:

    .venv/bin/python benchmarks/operator_scale.py [--jobs 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch

from forge_dev.controlplane import ControlPlane, free_port
from forge_dev.crds import install_crds, minimal_pytorchjob_crd_path

REPO_ROOT = Path(__file__).resolve().parent.parent
KUBEFLOW_CRD = REPO_ROOT.parent / "shared" / "fixtures" / "kubeflow.org_pytorchjobs.yaml"
NAMESPACE = "bench"


def forgejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "forge.dev/v1alpha1",
        "kind": "ForgeJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": "s3://models/llama-3.2-1b/"},
            "technique": "sft",
            "data": {"domain": [{"uri": "s3://acme/tickets/"}], "general": [{"uri": "s3://curated/chat/"}]},
            "checkpoints": {"output": f"s3://acme/forge/{name}/"},
            "resources": {"nodes": 2, "gpusPerNode": 8},
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def histogram_quantile(metrics_text: str, name: str, handler: str, q: float) -> float:
    """Prometheus-style quantile from cumulative buckets (linear interpolation inside a bucket)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{") and f'handler="{handler}"' in line:
            labels, value = line.rsplit(" ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(value)))
    buckets.sort()
    total = buckets[-1][1]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / (count - previous_count) if count > previous_count else 0.0
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, count
    return previous_bound


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PyTorchJobWatcher(threading.Thread):
    """Records when each PyTorchJob is first seen, from a watch stream."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(daemon=True)
        self.custom = client.CustomObjectsApi(api)
        self.seen: dict[str, float] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        stream = watch.Watch()
        while not self.stop_flag.is_set():
            for event in stream.stream(
                self.custom.list_namespaced_custom_object,
                "kubeflow.org",
                "v1",
                NAMESPACE,
                "pytorchjobs",
                timeout_seconds=5,
            ):
                name = event["object"]["metadata"]["name"]
                self.seen.setdefault(name, time.monotonic())
                if self.stop_flag.is_set():
                    break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8, help="threads applying the ForgeJobs")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    crd_files = [
        REPO_ROOT / "crds" / "forgejob.yaml",
        KUBEFLOW_CRD if KUBEFLOW_CRD.is_file() else minimal_pytorchjob_crd_path(),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    with ControlPlane() as plane:
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        api.configuration.connection_pool_maxsize = args.clients + 4
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
            idle_rss_kib = proc_status(operator.pid, "VmRSS")
            watcher = PyTorchJobWatcher(api)
            watcher.start()
            time.sleep(1.0)  # let the watch establish

            names = [f"job-{index:04d}" for index in range(args.jobs)]
            applied: dict[str, float] = {}

            def apply(name: str) -> None:
                custom.create_namespaced_custom_object("forge.dev", "v1alpha1", NAMESPACE, "forgejobs", forgejob(name))
                applied[name] = time.monotonic()

            started = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(apply, names))
            applied_all = time.monotonic() - started
            deadline = started + args.timeout
            while len(watcher.seen.keys() & set(names)) < len(names):
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(watcher.seen)} PyTorchJobs after {args.timeout} s; see {log_path}")
                time.sleep(0.05)
            all_pytorchjobs = max(watcher.seen[n] for n in names) - started

            def accepted_count() -> int:
                items = custom.list_namespaced_custom_object("forge.dev", "v1alpha1", NAMESPACE, "forgejobs")["items"]
                return sum(1 for item in items if (item.get("status") or {}).get("pytorchJob"))

            while accepted_count() < len(names):
                time.sleep(0.1)
            all_accepted = time.monotonic() - started
            latencies = [watcher.seen[n] - applied[n] for n in names]

            # Phase 2: the training operator reports Running for every job; how fast does every ForgeJob follow?
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            running = [
                {
                    "type": "Created",
                    "status": "True",
                    "reason": "PyTorchJobCreated",
                    "message": "created",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "PyTorchJobRunning",
                    "message": "running",
                    "lastTransitionTime": now,
                },
            ]
            mirror_started = time.monotonic()

            def mark_running(name: str) -> None:
                job = custom.get_namespaced_custom_object("kubeflow.org", "v1", NAMESPACE, "pytorchjobs", name)
                job["status"] = {"conditions": running}
                custom.replace_namespaced_custom_object_status(
                    "kubeflow.org", "v1", NAMESPACE, "pytorchjobs", name, job
                )

            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(mark_running, names))

            def running_count() -> int:
                items = custom.list_namespaced_custom_object("forge.dev", "v1alpha1", NAMESPACE, "forgejobs")["items"]
                return sum(1 for item in items if (item.get("status") or {}).get("state") == "Running")

            while running_count() < len(names):
                if time.monotonic() > deadline:
                    raise SystemExit(f"not every ForgeJob Running after {args.timeout} s; see {log_path}")
                time.sleep(0.1)
            all_running = time.monotonic() - mirror_started

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                metrics_text = response.read().decode()
            peak_rss_kib = proc_status(operator.pid, "VmHWM")
            cpu = cpu_seconds(operator.pid)
            watcher.stop_flag.set()
        finally:
            if operator.poll() is None:
                operator.send_signal(signal.SIGTERM)
                try:
                    operator.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()

    def quantiles(handler: str) -> str:
        p50 = histogram_quantile(metrics_text, "forge_reconcile_duration_seconds", handler, 0.5)
        p95 = histogram_quantile(metrics_text, "forge_reconcile_duration_seconds", handler, 0.95)
        return f"p50 {1000 * p50:.0f} ms, p95 {1000 * p95:.0f} ms"

    print(
        f"ForgeJobs applied                   : {args.jobs} from {args.clients} client threads in {applied_all:.2f} s"
    )
    print(f"every PyTorchJob exists after       : {all_pytorchjobs:.2f} s")
    print(f"every ForgeJob Accepted after       : {all_accepted:.2f} s")
    print(
        f"apply -> PyTorchJob per job         : p50 {statistics.median(latencies):.2f} s, "
        f"p95 {percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s"
    )
    print(f"reconcile handler latency           : {quantiles('reconcile')} (operator histogram)")
    print(f"PyTorchJob-event handler latency    : {quantiles('pytorchjob')}")
    print(f"every ForgeJob Running after        : {all_running:.2f} s after {args.jobs} PyTorchJobs reported Running")
    print(
        f"operator RSS                        : idle {idle_rss_kib / 1024:.0f} MiB, peak {peak_rss_kib / 1024:.0f} MiB"
    )
    print(f"operator CPU time                   : {cpu:.1f} s")
    print(f"operator log                        : {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
