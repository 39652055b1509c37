"""`make demo`: Forge end to end on one machine.

Starts a real local control plane, an S3 server on loopback, the Forge operator and the local training-operator
stand-in (it also plays Kubeflow Trainer v2: ``FORGE_DEMO_BACKEND=trainjob``, i.e. ``make demo BACKEND=trainjob``,
makes TrainJob the operator's default backend); builds (once, cached) a tiny base model pretrained on general text;
puts it and the demo datasets in S3; applies ``examples/demo-forgejob.yaml`` (mixed data within a forgetting
budget) and, beside it, ``examples/demo-naive-forgejob.yaml`` (domain data only, a learning rate too high); shows
both runs' live progress; prints why the guard stopped the naive run and what to change; ends with the mixed run's
selected checkpoint and a PNG plot of both runs' domain gain and forgetting against step. Exits 0 when the mixed
run succeeded and the guard stopped the naive one. Everything it started is stopped before it returns.
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
NAIVE_MANIFEST = Path("examples/demo-naive-forgejob.yaml")
DESCRIPTIONS = {
    "mixed": "75% domain / 25% general replay, the calibrated learning rate, a 5% forgetting budget",
    "naive": "domain data only at a learning rate several times too high; the guard may stop it",
}
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
    """What the demo saw of one run: one point per evaluation, for the plot."""

    points: list[dict[str, float]] = field(default_factory=list)

    def add(self, status: dict[str, Any]) -> bool:
        point = evaluation_point(status)
        if point is None:
            return False
        if self.points and (
            self.points[-1]["forgetting"] == point["forgetting"] and self.points[-1]["gain"] == point["gain"]
        ):
            return False  # no new evaluation since the last poll
        if self.points and self.points[-1]["step"] >= point["step"]:
            return False
        self.points.append(point)
        return True


def evaluation_point(status: dict[str, Any]) -> dict[str, float] | None:
    """The step and the latest held-out figures of a status; None before the first evaluation."""
    latest = status.get("latest") or {}
    step = (status.get("progress") or {}).get("step")
    if step is None or latest.get("forgettingPercent") is None:
        return None
    return {
        "step": float(step),
        "forgetting": float(latest["forgettingPercent"]),
        "gain": float(latest.get("domainGainPercent") or 0.0),
    }


def fmt(value: Any, suffix: str = "") -> str:
    return "-" if value is None else (f"{value:.2f}{suffix}" if isinstance(value, float) else f"{value}{suffix}")


def table_row(name: str, status: dict[str, Any]) -> str:
    """One line of the live progress table: a job's state, step and latest figures."""
    progress = status.get("progress") or {}
    latest = status.get("latest") or {}
    selected = status.get("selected") or {}
    step = f"{progress.get('step', 0)}/{progress.get('totalSteps', '?')}"
    return (
        f"{name:<18} {status.get('state') or 'Pending':<13} {step:>7} {fmt(latest.get('domainGainPercent'), '%'):>12} "
        f"{fmt(latest.get('forgettingPercent'), '%'):>11} {fmt(latest.get('tokensPerSecond')):>9} "
        f"{fmt(selected.get('step')):>9}"
    )


TABLE_HEADER = (
    f"{'FORGEJOB':<18} {'STATE':<13} {'STEP':>7} {'DOMAIN GAIN':>12} {'FORGETTING':>11} {'TOKENS/S':>9} {'SELECTED':>9}"
)


@dataclass(frozen=True)
class Series:
    """One run's lines on the plot, and its marks: the selected checkpoint, the guard's stop."""

    name: str
    steps: list[float]
    gain: list[float]
    forgetting: list[float]
    selected: tuple[float, float, float] | None = None  # step, domain gain, forgetting
    stopped: tuple[float, float, float] | None = None  # step, domain gain, forgetting at the guard's stop
    stop_reason: str | None = None
    selected_label: str | None = None  # the selected checkpoint or candidate in words


def plot_series(name: str, history: History, status: dict[str, Any]) -> Series:
    """A run's plot data: its evaluations in step order, the selected checkpoint, where the guard stopped it."""
    points = sorted(history.points, key=lambda p: p["step"])
    selected = status.get("selected") or {}
    chosen = None
    if selected.get("step") is not None and selected.get("forgettingPercent") is not None:
        chosen = (
            float(selected["step"]),
            float(selected.get("domainGainPercent") or 0.0),
            float(selected["forgettingPercent"]),
        )
    stop = status.get("earlyStop") or {}
    stopped = None
    if status.get("state") == "EarlyStopped" and points:
        last = points[-1]
        stopped = (float(stop.get("step") or last["step"]), last["gain"], last["forgetting"])
    return Series(
        name=name,
        steps=[p["step"] for p in points],
        gain=[p["gain"] for p in points],
        forgetting=[p["forgetting"] for p in points],
        selected=chosen,
        stopped=stopped,
        stop_reason=stop.get("reason") if stopped else None,
        selected_label=describe(selected) if chosen else None,
    )


def plot(runs: list[Series], budget: float, path: Path) -> None:
    """Two panels, one line per run: domain gain against step, forgetting against step with the budget line; the
    selected checkpoint circled, a guard stop crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gain_axes, forget_axes) = plt.subplots(1, 2, figsize=(12, 5.5), sharex=True)
    for run in runs:
        (line,) = gain_axes.plot(run.steps, run.gain, marker=".", label=run.name)
        forget_axes.plot(run.steps, run.forgetting, marker=".", color=line.get_color(), label=run.name)
        for axes, index in ((gain_axes, 1), (forget_axes, 2)):
            if run.selected is not None:
                axes.scatter(
                    [run.selected[0]],
                    [run.selected[index]],
                    s=220,
                    facecolors="none",
                    edgecolors=line.get_color(),
                    linewidths=2,
                    zorder=4,
                    label=f"{run.name}: selected, {run.selected_label}",
                )
            if run.stopped is not None:
                axes.scatter(
                    [run.stopped[0]],
                    [run.stopped[index]],
                    s=120,
                    marker="X",
                    color=line.get_color(),
                    edgecolors="black",
                    zorder=4,
                    label=f"{run.name}: stopped by the guard ({run.stop_reason})",
                )
    forget_axes.axhline(budget, linestyle="--", color="grey", label=f"forgetting budget {budget:g}%")
    gain_axes.set_title("domain gain (domain held-out loss below the base model)")
    forget_axes.set_title("forgetting (general held-out loss above the base model)")
    for axes in (gain_axes, forget_axes):
        axes.set_xlabel("step")
        axes.set_ylabel("percent of the base model's held-out loss")
        axes.grid(alpha=0.3)
    handles, labels = forget_axes.get_legend_handles_labels()  # every line and mark, and the budget
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize="small")
    figure.suptitle("Forge demo: mixed data within a forgetting budget vs. naive fine-tuning")
    figure.tight_layout(rect=(0.0, 0.14, 1.0, 1.0))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def demo_problems(good: dict[str, Any], naive: dict[str, Any], naive_history: History) -> list[str]:
    """Why the demo did not show what it should (empty: it did): the mixed run succeeds with a selected checkpoint,
    the naive run is stopped by the guard with its final evaluation in the status."""
    problems = []
    if good.get("state") != "Succeeded":
        problems.append(f"the mixed run ended {good.get('state') or 'unfinished'}, not Succeeded")
    elif not good.get("selected"):
        problems.append("the mixed run selected no checkpoint")
    stop = naive.get("earlyStop") or {}
    if naive.get("state") != "EarlyStopped":
        problems.append(f"the naive run ended {naive.get('state') or 'unfinished'}: the guard did not stop it")
    elif stop.get("action") != "stop" or not stop.get("reason"):
        problems.append(f"the naive run has no stop verdict in status.earlyStop: {stop}")
    elif not naive_history.points or naive_history.points[-1]["step"] != float(stop.get("step", -1)):
        seen = naive_history.points[-1]["step"] if naive_history.points else None
        problems.append(
            f"the evaluation that stopped the naive run (step {stop.get('step')}) is not in the status "
            f"(last seen: step {seen})"
        )
    return problems


def stop_lines(status: dict[str, Any]) -> list[str]:
    """The guard's stop in words, from the status: reason, rule, message, suggestion and the operator's advice."""
    stop = status.get("earlyStop") or {}
    if not stop:
        return []
    lines = [f"   stopped at step {stop.get('step')}: {stop.get('reason')} (rule {stop.get('rule')})"]
    if stop.get("message"):
        lines.append(f"   why: {stop['message']}")
    suggestion = stop.get("suggestion") or {}
    if suggestion:
        lines.append("   next run: " + ", ".join(f"{key} {value}" for key, value in suggestion.items()))
    for condition in status.get("conditions") or []:
        if condition["type"] == "ForgettingWithinBudget" and condition.get("status") == "False":
            lines.append(f"   advice: {condition.get('message', '')}")
    return lines


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
    naive_name = yaml.safe_load((repo_root / NAIVE_MANIFEST).read_text())["metadata"]["name"]
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
        print(f"== kubectl apply -f {DEMO_MANIFEST} -f {NAIVE_MANIFEST}", flush=True)
        print(f"   {name}: {DESCRIPTIONS['mixed']}\n   {naive_name}: {DESCRIPTIONS['naive']}", flush=True)
        kubectl(plane.kubeconfig, "apply", "-f", str(repo_root / DEMO_MANIFEST), "-f", str(repo_root / NAIVE_MANIFEST))
        runs = watch_progress(api, [name, naive_name], timeout_s)
        print("== kubectl get forgejobs", flush=True)
        kubectl(plane.kubeconfig, "get", "forgejobs", "-o", "wide")
        (status, history), (naive, naive_history) = runs[name], runs[naive_name]
        png = out / "support-bot.png"
        plot([plot_series(name, history, status), plot_series(naive_name, naive_history, naive)], budget, png)
        selected = status.get("selected") or {}
        print(f"== {naive_name}: {naive.get('state')}")
        for line in stop_lines(naive):
            print(line)
        if naive.get("selected"):
            kept = naive["selected"]
            print(
                f"   kept from it: {describe(kept)} (forgetting {fmt(kept.get('forgettingPercent'), '%')}, "
                f"domain gain {fmt(kept.get('domainGainPercent'), '%')}): {kept.get('uri')}"
            )
        print(f"== {name}: {status.get('state')}")
        for condition in status.get("conditions") or []:
            if condition.get("status") == "True" or condition["type"] in ("Failed", "ForgettingWithinBudget"):
                print(
                    f"   {condition['type']}={condition['status']} {condition.get('reason', '')}: "
                    f"{condition.get('message', '')}"
                )
        print(f"== {name}: checkpoints and end-of-run candidates (held-out forgetting %, domain gain %)")
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
            f"== replica logs: {standin_dir / NAMESPACE}/<forgejob>/*.log "
            f"(python -m forge_dev.training_operator_standin logs {name} --workdir {standin_dir})"
        )
    print("== everything stopped")
    problems = demo_problems(status, naive, naive_history)
    for problem in problems:
        print(f"demo: {problem}", file=sys.stderr)
    return 1 if problems else 0


def describe(entry: dict[str, Any]) -> str:
    """A checkpoint or candidate in words."""
    kind = entry.get("kind") or "checkpoint"
    if kind == "average":
        return f"average of steps {entry.get('averageOf')}"
    if kind == "interpolation":
        return f"interpolation alpha {entry.get('alpha')} of step {entry.get('step')}"
    return f"checkpoint step {entry.get('step')}"


def watch_progress(
    api: client.ApiClient, names: list[str], timeout_s: float
) -> dict[str, tuple[dict[str, Any], History]]:
    """Print a table row whenever a ForgeJob's progress changes, until every one has ended; each one's final status
    and the evaluations seen."""
    objects = client.CustomObjectsApi(api)
    histories = {name: History() for name in names}
    statuses: dict[str, dict[str, Any]] = {name: {} for name in names}
    last_rows: dict[str, str] = {}
    print(TABLE_HEADER, flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name in names:
            if statuses[name].get("state") in TERMINAL_STATES:
                continue
            found = objects.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
            statuses[name] = found.get("status") or {}
            histories[name].add(statuses[name])
            row = table_row(name, statuses[name])
            if row != last_rows.get(name):
                print(row, flush=True)
                last_rows[name] = row
        if all(status.get("state") in TERMINAL_STATES for status in statuses.values()):
            break
        time.sleep(1.0)
    else:
        print(f"demo: the ForgeJobs did not all finish within {timeout_s:.0f} s", file=sys.stderr)
    return {name: (statuses[name], histories[name]) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo-root", type=Path, default=Path.cwd())
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="logs, replica folders and the plot")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the ForgeJob to finish")
    args = parser.parse_args(argv)
    return run_demo(args.repo_root.resolve(), args.out.resolve(), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
