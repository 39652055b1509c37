"""`make demo`: Forge end to end on one machine.

Starts a real local control plane, an S3 server on loopback, the Forge operator and the local training-operator
stand-in (it also plays Kubeflow Trainer v2: ``FORGE_DEMO_BACKEND=trainjob``, i.e. ``make demo BACKEND=trainjob``,
makes TrainJob the operator's default backend); builds (once, cached) a tiny base model pretrained on general text;
puts it and the demo datasets in S3; applies ``examples/demo-forgejob.yaml``; shows live progress; ends with the
selected checkpoint and a PNG plot of domain gain and forgetting against step. Everything it started is stopped
before it returns.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from forge_dev.basemodel import build_base_model
from forge_dev.controlplane import ControlPlane
from forge_dev.crds import install_crds, install_trainer_v2, minimal_pytorchjob_crd_path
from forge_dev.services import S3Server, operator_process, s3_server
from forge_dev.standin import StandInSettings, standin_thread

DEMO_MANIFEST = Path("examples/demo-forgejob.yaml")
BUCKET = "forge-demo"
NAMESPACE = "default"
TERMINAL_STATES = ("Succeeded", "Failed", "EarlyStopped")
GROUP, VERSION, PLURAL = "forge.dev", "v1alpha1", "forgejobs"


def pytorchjob_crd(repo_root: Path) -> Path:
    """Kubeflow's PyTorchJob CRD when a copy sits beside the repository, else Forge's minimal one."""
    kubeflow = repo_root.parent / "shared" / "fixtures" / "kubeflow.org_pytorchjobs.yaml"
    if kubeflow.is_file():
        return kubeflow
    print(f"note: {kubeflow} not found; using Forge's minimal PyTorchJob CRD", file=sys.stderr)
    return minimal_pytorchjob_crd_path()


def trainer_v2_folder(repo_root: Path) -> Path | None:
    """Kubeflow Trainer v2.3.0's CRDs and runtime when they sit beside the repository, else None (Forge's minimal)."""
    folder = repo_root.parent / "shared" / "fixtures" / "kubeflow-trainer-v2.3.0"
    if (folder / "trainer.kubeflow.org_trainjobs.yaml").is_file():
        return folder
    print(f"note: {folder} not found; using Forge's minimal TrainJob CRD and torch runtime", file=sys.stderr)
    return None


def demo_backend() -> str:
    """The child job the demo runs: FORGE_DEMO_BACKEND (pytorchjob or trainjob; `make demo BACKEND=...`)."""
    backend = os.environ.get("FORGE_DEMO_BACKEND", "").strip() or "pytorchjob"
    if backend not in ("pytorchjob", "trainjob"):
        raise SystemExit(f"FORGE_DEMO_BACKEND={backend!r}: expected pytorchjob or trainjob")
    return backend


def s3_client(server: S3Server) -> Any:
    import boto3

    env = server.client_env()
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def upload_folder(s3: Any, folder: Path, bucket: str, prefix: str) -> int:
    """Upload every file under ``folder`` to s3://bucket/prefix/...; returns the number of files."""
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")
        count += 1
    return count


def s3_secret(server: S3Server, name: str = "forge-demo-s3") -> client.V1Secret:
    env = server.client_env()
    data = {
        "endpoint": server.endpoint,
        "accessKeyId": env["AWS_ACCESS_KEY_ID"],
        "secretAccessKey": env["AWS_SECRET_ACCESS_KEY"],
    }
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name), data=encoded)


def kubectl(kubeconfig: Path, *args: str) -> None:
    binary = shutil.which("kubectl")
    if binary is None:
        raise SystemExit("kubectl not found: run `make tools` (it installs one into ~/.cache/forge/bin)")
    subprocess.run([binary, f"--kubeconfig={kubeconfig}", *args], check=True)


@dataclass
class History:
    """What the demo saw of the run: one point per evaluation, for the table and the plot."""

    points: list[dict[str, float]] = field(default_factory=list)

    def add(self, status: dict[str, Any]) -> bool:
        latest = status.get("latest") or {}
        step = (status.get("progress") or {}).get("step")
        if step is None or latest.get("forgettingPercent") is None:
            return False
        point = {
            "step": float(step),
            "forgetting": float(latest["forgettingPercent"]),
            "gain": float(latest.get("domainGainPercent") or 0.0),
        }
        if self.points and self.points[-1]["forgetting"] == point["forgetting"]:
            return False  # no new evaluation since the last poll
        self.points.append(point)
        return True


def fmt(value: Any, suffix: str = "") -> str:
    return "-" if value is None else (f"{value:.2f}{suffix}" if isinstance(value, float) else f"{value}{suffix}")


def table_row(status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    latest = status.get("latest") or {}
    selected = status.get("selected") or {}
    step = f"{progress.get('step', 0)}/{progress.get('totalSteps', '?')}"
    return (
        f"{status.get('state') or 'Pending':<13} {step:>9} {fmt(latest.get('domainGainPercent'), '%'):>12} "
        f"{fmt(latest.get('forgettingPercent'), '%'):>11} {fmt(latest.get('tokensPerSecond')):>10} "
        f"{fmt(selected.get('step')):>9}"
    )


TABLE_HEADER = f"{'STATE':<13} {'STEP':>9} {'DOMAIN GAIN':>12} {'FORGETTING':>11} {'TOKENS/S':>10} {'SELECTED':>9}"


def plot(history: History, status: dict[str, Any], budget: float, path: Path) -> None:
    """Domain gain and forgetting against step, the budget line, checkpoints marked, the selected one circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    steps = [p["step"] for p in history.points]
    axes.plot(steps, [p["gain"] for p in history.points], marker=".", label="domain gain %")
    axes.plot(steps, [p["forgetting"] for p in history.points], marker=".", label="forgetting %")
    axes.axhline(budget, linestyle="--", color="grey", label=f"forgetting budget {budget:g}%")
    checkpoints = [c for c in status.get("checkpoints") or [] if c.get("kind", "checkpoint") == "checkpoint"]
    if checkpoints:
        axes.scatter(
            [c["step"] for c in checkpoints],
            [c.get("forgettingPercent") or 0.0 for c in checkpoints],
            marker="s",
            color="black",
            zorder=3,
            label="checkpoints (forgetting)",
        )
    selected = status.get("selected")
    if selected and selected.get("forgettingPercent") is not None:
        axes.scatter(
            [selected["step"]],
            [selected["forgettingPercent"]],
            s=200,
            facecolors="none",
            edgecolors="red",
            zorder=4,
            label=f"selected ({selected.get('kind', 'checkpoint')})",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("percent of the base model's held-out loss")
    axes.set_title("Forge demo: support-bot")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@contextmanager
def step(message: str) -> Iterator[None]:
    started = time.perf_counter()
    print(f"== {message}", flush=True)
    yield
    print(f"   done in {time.perf_counter() - started:.1f} s", flush=True)


def run_demo(repo_root: Path, out: Path, timeout_s: float) -> int:
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the local API server's own certificate
    out.mkdir(parents=True, exist_ok=True)
    manifest = yaml.safe_load((repo_root / DEMO_MANIFEST).read_text())
    name = manifest["metadata"]["name"]
    budget = float(manifest["spec"]["forgetting"]["budgetPercent"])
    backend = demo_backend()
    with ExitStack() as stack:
        with step("building the tiny base model (cached after the first run)"):
            base = build_base_model()
            print(f"   {base.folder} ({base.report['parameters']:,} parameters)")
        with step("starting a local control plane (etcd, kube-apiserver, kube-controller-manager)"):
            plane = stack.enter_context(ControlPlane())
            os.environ["KUBECONFIG"] = str(plane.kubeconfig)
            api = stack.enter_context(config.new_client_from_config(config_file=str(plane.kubeconfig)))
            install_crds(api, [*sorted((repo_root / "crds").glob("*.yaml")), pytorchjob_crd(repo_root)])
            install_trainer_v2(api, trainer_v2_folder(repo_root))
        with step("starting an S3 server on loopback and uploading the base model and datasets"):
            s3_service = stack.enter_context(s3_server(out / "logs" / "s3.log"))
            s3 = s3_client(s3_service)
            s3.create_bucket(Bucket=BUCKET)
            files = upload_folder(s3, base.folder, BUCKET, "models/tiny-base")
            files += upload_folder(s3, base.general, BUCKET, "data/general")
            files += upload_folder(s3, base.domain, BUCKET, "data/domain")
            print(f"   {files} files in s3://{BUCKET}/ at {s3_service.endpoint}")
            client.CoreV1Api(api).create_namespaced_secret(NAMESPACE, s3_secret(s3_service))
        with step(f"starting the Forge operator (default backend {backend}) and the local Kubeflow stand-in"):
            operator_env = {"FORGE_DEFAULT_BACKEND": backend}
            log = out / "logs" / "operator.log"
            stack.enter_context(operator_process(plane.kubeconfig, log, [NAMESPACE], operator_env))
            standin_dir = out / "standin"
            stack.enter_context(standin_thread(api, StandInSettings(workdir=standin_dir, namespace=NAMESPACE)))
        print(f"== kubectl apply -f {DEMO_MANIFEST}", flush=True)
        kubectl(plane.kubeconfig, "apply", "-f", str(repo_root / DEMO_MANIFEST))
        status = watch_progress(api, name, timeout_s)
        print("== kubectl get forgejobs", flush=True)
        kubectl(plane.kubeconfig, "get", "forgejobs", "-o", "wide")
        history = status.pop("_history")
        png = out / "support-bot.png"
        plot(history, status, budget, png)
        selected = status.get("selected") or {}
        print(f"== final state: {status.get('state')}")
        for condition in status.get("conditions") or []:
            if condition.get("status") == "True" or condition["type"] in ("Failed", "ForgettingWithinBudget"):
                print(
                    f"   {condition['type']}={condition['status']} {condition.get('reason', '')}: "
                    f"{condition.get('message', '')}"
                )
        print("== checkpoints and end-of-run candidates (held-out forgetting %, domain gain %)")
        for entry in status.get("checkpoints") or []:
            mark = "*" if selected and entry.get("uri") == selected.get("uri") else " "
            print(
                f" {mark} {describe(entry):<36} {fmt(entry.get('forgettingPercent')):>7} "
                f"{fmt(entry.get('domainGainPercent')):>7}"
            )
        if selected:
            print(f"== selected: {describe(selected)}: {selected.get('uri')}")
            print(f"   why: {selected.get('reason')}")
        print(f"== plot: {png}")
        print(
            f"== replica logs: {standin_dir / NAMESPACE / name}/*.log "
            f"(python -m forge_dev.training_operator_standin logs {name} --workdir {standin_dir})"
        )
    print("== everything stopped")
    return 0 if status.get("state") == "Succeeded" and selected else 1


def describe(entry: dict[str, Any]) -> str:
    """A checkpoint or candidate in words."""
    kind = entry.get("kind") or "checkpoint"
    if kind == "average":
        return f"average of steps {entry.get('averageOf')}"
    if kind == "interpolation":
        return f"interpolation alpha {entry.get('alpha')} of step {entry.get('step')}"
    return f"checkpoint step {entry.get('step')}"


def watch_progress(api: client.ApiClient, name: str, timeout_s: float) -> dict[str, Any]:
    """Print a table row whenever the ForgeJob's progress changes; return the final status (+ the history)."""
    objects = client.CustomObjectsApi(api)
    history = History()
    print(TABLE_HEADER, flush=True)
    last_row = ""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name).get("status") or {}
        history.add(status)
        row = table_row(status)
        if row != last_row:
            print(row, flush=True)
            last_row = row
        if status.get("state") in TERMINAL_STATES:
            break
        time.sleep(1.0)
    else:
        print(f"demo: the ForgeJob did not finish within {timeout_s:.0f} s", file=sys.stderr)
    status["_history"] = history
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo-root", type=Path, default=Path.cwd())
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="logs, replica folders and the plot")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the ForgeJob to finish")
    args = parser.parse_args(argv)
    return run_demo(args.repo_root.resolve(), args.out.resolve(), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
