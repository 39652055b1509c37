"""The whole path on one machine, with real parts only.

kubectl-style apply of a ForgeJob -> the real operator -> PyTorchJob (or, backend trainjob, a Kubeflow Trainer v2
TrainJob whose nodes read the runtime's PET_* variables) -> the local training-operator stand-in -> two real
forge-trainer ranks (DeepSpeed over gloo) reading data from and writing checkpoints to an S3 server on loopback
-> status.checkpoints -> status.selected -> Succeeded, while a real Prometheus scrapes the operator and both ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from forge_dev.demo import s3_client, s3_secret, upload_folder
from forge_dev.services import OperatorService, PrometheusServer, operator_process, prometheus_server, s3_server
from forge_dev.standin import StandInSettings, standin_thread
from forge_trainer.checkpoint import MANIFEST
from tests.conftest import LocalCluster

T = TypeVar("T")
GROUP, VERSION, PLURAL = "forge.dev", "v1alpha1", "forgejobs"
BUCKET = "forge-e2e"


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float, context: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{context()}")


@dataclass
class Stack:
    """The running services of one end-to-end test."""

    cluster: LocalCluster
    namespace: str
    workdir: Path
    api: client.ApiClient
    operator: OperatorService
    prometheus: PrometheusServer
    file_sd: Path
    s3: Any

    def forgejob(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return result

    def logs(self) -> str:
        parts = []
        for path in sorted(self.workdir.rglob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)[-15000:]

    def scrape_trainers(self, job: str) -> list[str]:
        """Point Prometheus at every replica's metrics port (from the stand-in's state.json); returns the targets."""
        state_path = self.workdir / "standin" / self.namespace / job / "state.json"
        if not state_path.is_file():
            return []
        replicas = json.loads(state_path.read_text())["replicas"]
        targets = [f"127.0.0.1:{r['metricsPort']}" for r in replicas.values() if r.get("metricsPort")]
        operator_target = f"127.0.0.1:{self.operator.metrics_port}"
        self.file_sd.write_text(json.dumps([{"targets": [operator_target, *targets]}]))
        return targets

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


# Stall drills: a small stall floor (the derived limit is max(floor, 3 x the report gap)), frequent checks and
# frequent progress reports, so that a stall is seen within about half a minute.
DRILL_OPERATOR_ENV = {
    "FORGE_STALL_FLOOR_SECONDS": "20",
    "FORGE_LIVENESS_CHECK_SECONDS": "2",
    "FORGE_REPORT_MIN_INTERVAL_SECONDS": "2",
}


@pytest.fixture
def stack(cluster: LocalCluster, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(cluster, namespace, tmp_path, {}) as running:
        yield running


@pytest.fixture
def drill_stack(cluster: LocalCluster, namespace: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(cluster, namespace, tmp_path, DRILL_OPERATOR_ENV) as running:
        yield running


@contextmanager
def running_stack(
    cluster: LocalCluster, namespace: str, tmp_path: Path, operator_env: dict[str, str]
) -> Iterator[Stack]:
    with ExitStack() as services, cluster.api_client() as api:
        s3 = services.enter_context(s3_server(tmp_path / "s3.log"))
        file_sd = tmp_path / "targets.json"
        file_sd.write_text("[]")
        prometheus = services.enter_context(prometheus_server(tmp_path / "prometheus", file_sd, "1s"))
        operator = services.enter_context(
            operator_process(cluster.kubeconfig, tmp_path / "operator.log", [namespace], operator_env)
        )
        services.enter_context(standin_thread(api, StandInSettings(workdir=tmp_path / "standin", namespace=namespace)))
        s3_api = s3_client(s3)
        _upload_inputs(s3_api, tmp_path / "inputs")
        client.CoreV1Api(api).create_namespaced_secret(namespace, s3_secret(s3))
        yield Stack(cluster, namespace, tmp_path, api, operator, prometheus, file_sd, s3_api)


def _upload_inputs(s3: Any, folder: Path) -> None:
    from forge_trainer import tiny

    s3.create_bucket(Bucket=BUCKET)
    upload_folder(s3, tiny.make_model_folder(folder / "model"), BUCKET, "model")
    tiny.write_corpus(folder / "data" / "domain.jsonl", "chat", 3000, seed=1)
    tiny.write_corpus(folder / "data" / "general.jsonl", "general", 2000, seed=2)
    tiny.write_corpus(folder / "data" / "eval-domain.jsonl", "chat", 80, seed=3)
    tiny.write_corpus(folder / "data" / "eval-general.jsonl", "general", 80, seed=4)
    upload_folder(s3, folder / "data", BUCKET, "data")


def forgejob(
    name: str, learning_rate: str, max_steps: int, budget_percent: int = 50, backend: str = "pytorchjob"
) -> dict[str, Any]:
    env = [
        {"name": "AWS_ENDPOINT_URL", "valueFrom": {"secretKeyRef": {"name": "forge-demo-s3", "key": "endpoint"}}},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "forge-demo-s3", "key": "accessKeyId"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "forge-demo-s3", "key": "secretAccessKey"}},
        },
        {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "FORGE_REPORT_FLUSH_S", "value": "2"},
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ForgeJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": f"s3://{BUCKET}/model/"},
            "technique": "sft",
            "data": {
                "domainPercent": 75,
                "domain": [{"uri": f"s3://{BUCKET}/data/domain.jsonl"}],
                "general": [{"uri": f"s3://{BUCKET}/data/general.jsonl"}],
                "seqLength": 128,
            },
            "eval": {
                "everySteps": 5,
                "maxTokens": 2048,
                "domain": [{"uri": f"s3://{BUCKET}/data/eval-domain.jsonl"}],
                "general": [{"uri": f"s3://{BUCKET}/data/eval-general.jsonl"}],
            },
            "training": {
                "learningRate": learning_rate,
                "maxSteps": max_steps,
                "microBatchSize": 4,
                "globalBatchTokens": 1024,
                "precision": "fp32",
                "warmupPercent": 10,
            },
            "forgetting": {"budgetPercent": budget_percent, "action": "stop"},
            "checkpoints": {"everySteps": 10, "output": f"s3://{BUCKET}/checkpoints/{name}/", "keep": 2},
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "env": env,
            "backend": backend,
        },
    }


# The two scenarios that run on both backends (the others, slow too, on the default one).
BACKENDS = pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])


@pytest.mark.slow
@pytest.mark.timeout(400)
@BACKENDS
def test_apply_to_selected_checkpoint_with_prometheus(stack: Stack, backend: str) -> None:
    name = "e2e"
    client.CustomObjectsApi(stack.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, forgejob(name, "3e-3", 30, backend=backend)
    )
    wait_for(lambda: stack.scrape_trainers(name), "both trainer ranks to start", 120, stack.logs)
    wait_for(
        lambda: stack.query(f'forge_trainer_tokens_per_second{{forge_job="{name}"}} > 0'),
        "Prometheus to scrape tokens/s from a trainer rank",
        120,
        stack.logs,
    )

    def finished() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        if status.get("state") in ("Failed", "EarlyStopped", "Invalid"):
            raise AssertionError(f"the run ended {status.get('state')}: {json.dumps(status, indent=1)}\n{stack.logs()}")
        return status if status.get("state") == "Succeeded" and status.get("selected") else None

    status = wait_for(finished, "the ForgeJob to succeed with a selected checkpoint", 300, stack.logs)
    # The run was the backend's child job, and only that one.
    field, other = ("trainJob", "pytorchJob") if backend == "trainjob" else ("pytorchJob", "trainJob")
    assert status[field] == name and other not in status, status
    group, version, plural, done = {
        "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs", "Succeeded"),
        "trainjob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "Complete"),
    }[backend]
    job = client.CustomObjectsApi(stack.api).get_namespaced_custom_object(group, version, stack.namespace, plural, name)
    assert {c["type"]: c["status"] for c in job["status"]["conditions"]}[done] == "True", job["status"]

    # Both ranks trained: the PyTorchJob had a master and a worker, and both reported tokens/s to Prometheus. The
    # ranks have exited by now, so their series are stale: look back over the run instead of at the last instant.
    query = f'max_over_time(forge_trainer_tokens_per_second{{forge_job="{name}"}}[10m]) > 0'
    ranks = {series["metric"]["rank"] for series in stack.query(query)}
    assert ranks == {"0", "1"}, ranks

    # Checkpoints landed in S3 with their manifests; status lists them; the selected one is one of them.
    steps = sorted(c["step"] for c in status["checkpoints"] if c.get("kind", "checkpoint") == "checkpoint")
    assert steps[-1] == 30 and set(steps) <= {10, 20, 30}
    selected = status["selected"]
    assert selected["uri"] in {c["uri"] for c in status["checkpoints"]}
    assert selected.get("reason")
    keys = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"checkpoints/{name}/")["Contents"]}
    for step in steps:
        assert f"checkpoints/{name}/step-{step:08d}/{MANIFEST}" in keys, sorted(keys)[:20]
    assert status["baseline"]["generalLoss"] > 0
    assert status["progress"]["step"] == 30

    # End-of-run candidates were evaluated, published beside the checkpoints and offered to selection.
    derived = {
        (c["kind"], c.get("alpha")): c for c in status["checkpoints"] if c.get("kind", "checkpoint") != "checkpoint"
    }
    assert set(derived) == {("average", None), ("interpolation", 0.25), ("interpolation", 0.5), ("interpolation", 0.75)}
    assert derived[("average", None)]["averageOf"] == [10, 20, 30]
    for entry in derived.values():
        assert entry["domainGainPercent"] is not None and entry["forgettingPercent"] is not None, entry
        prefix = entry["uri"].removeprefix(f"s3://{BUCKET}/")
        assert prefix.startswith(f"checkpoints/{name}/candidates/")
        assert f"{prefix}/{MANIFEST}" in keys and f"{prefix}/model.safetensors" in keys

    # Forgetting and domain gain were measured against the base model and exported.
    assert stack.query(f'last_over_time(forge_trainer_forgetting_percent{{forge_job="{name}"}}[10m])'), "no forgetting"
    assert status["latest"]["domainGainPercent"] > 0, status["latest"]

    # The operator's job-state gauge counts this ForgeJob as Succeeded.
    def succeeded_gauge() -> list[dict[str, Any]]:
        return stack.query('forge_forgejobs{state="Succeeded"} >= 1')

    wait_for(succeeded_gauge, "the operator's forge_forgejobs{state=Succeeded} in Prometheus", 30, stack.logs)

    # No false alarm: a healthy run never stalled (Progressing never False, no stall restart, the gauge stayed 0)
    # and was never degraded.
    kinds = {c["type"]: c for c in status["conditions"]}
    assert kinds.get("Progressing", {}).get("status", "True") == "True", kinds.get("Progressing")
    assert kinds.get("ThroughputDegraded", {}).get("status", "False") != "True", kinds.get("ThroughputDegraded")
    assert not status.get("stallRestarts") and not status.get("lastStallRestart")
    assert not stack.query(f'max_over_time(forge_forgejob_stalled{{forge_job="{name}"}}[10m]) > 0')
    assert stack.query(f'forge_forgejob_stalled{{forge_job="{name}"}} == 0'), "the stall gauge is not exported"
    # The pace of the two ranks was judged (status.pace, ThroughputDegraded=False) and no one was named.
    assert status["pace"]["ranks"] == 2 and not status["pace"].get("straggler"), status["pace"]
    assert kinds["ThroughputDegraded"]["reason"] == "Normal", kinds["ThroughputDegraded"]
    events = client.CoreV1Api(stack.api).list_namespaced_event(stack.namespace).items
    assert not [e.message for e in events if e.reason in ("Stalled", "Straggler", "ThroughputDrop")]


@pytest.mark.slow
@pytest.mark.timeout(400)
@BACKENDS
def test_an_aggressive_learning_rate_is_stopped_early_with_its_reason(stack: Stack, backend: str) -> None:
    from forge_dev.basemodel import build_base_model

    # A base model with a general ability to lose (pretrained on general prose, cached), fine-tuned on support chats
    # at the highest learning rate the API accepts.
    base = build_base_model()
    upload_folder(stack.s3, base.folder, BUCKET, "pretrained")
    upload_folder(stack.s3, base.general, BUCKET, "corpora/general")
    upload_folder(stack.s3, base.domain, BUCKET, "corpora/domain")
    name = "too-hot"
    max_steps = 60
    manifest = forgejob(name, "1e-2", max_steps, budget_percent=5, backend=backend)
    spec = manifest["spec"]
    spec["model"]["base"] = f"s3://{BUCKET}/pretrained/"
    spec["data"]["domain"] = [{"uri": f"s3://{BUCKET}/corpora/domain/train.jsonl"}]
    spec["data"]["general"] = [{"uri": f"s3://{BUCKET}/corpora/general/train.jsonl"}]
    spec["eval"]["domain"] = [{"uri": f"s3://{BUCKET}/corpora/domain/eval.jsonl"}]
    spec["eval"]["general"] = [{"uri": f"s3://{BUCKET}/corpora/general/eval.jsonl"}]
    client.CustomObjectsApi(stack.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, manifest
    )

    def stopped() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        if status.get("state") in ("Succeeded", "Failed", "Invalid"):
            raise AssertionError(f"the run ended {status.get('state')}: {json.dumps(status, indent=1)}\n{stack.logs()}")
        return status if status.get("state") == "EarlyStopped" else None

    status = wait_for(stopped, "the ForgeJob to be stopped early", 300, stack.logs)
    early = status["earlyStop"]
    assert early["reason"] in {"LearningRateTooHigh", "ForgettingBudgetExceeded", "LossDiverged", "NonFiniteLoss"}
    assert early["step"] <= max_steps // 3, early
    condition = {c["type"]: c for c in status["conditions"]}["EarlyStopped"]
    assert condition["status"] == "True" and condition["reason"] == early["reason"]
    assert condition["message"], condition
    assert status["progress"]["step"] < max_steps


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bad_data_fails_at_once_with_file_and_line_in_the_status(stack: Stack) -> None:
    """Garbage in a domain file is a permanent error: the trainer reports it before exiting with the data-error code,
    the ForgeJob's Failed condition quotes it with file and line, and restartPolicy ExitCode does not retry it."""
    from forge_trainer import tiny

    good = tiny.write_corpus(stack.workdir / "bad-data" / "good.jsonl", "chat", 200, seed=5).read_text().splitlines()
    bad = "\n".join([good[0], '{"messages": 5}', *good[1:]]) + "\n"
    stack.s3.put_object(Bucket=BUCKET, Key="data/bad.jsonl", Body=bad.encode())
    name = "bad-data"
    manifest = forgejob(name, "3e-3", 30)
    manifest["spec"]["data"]["domain"] = [{"uri": f"s3://{BUCKET}/data/bad.jsonl"}]
    manifest["spec"]["data"]["maxBadLines"] = 0
    client.CustomObjectsApi(stack.api).create_namespaced_custom_object(
        GROUP, VERSION, stack.namespace, PLURAL, manifest
    )

    def failed() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        if status.get("state") in ("Succeeded", "EarlyStopped", "Invalid"):
            raise AssertionError(f"the run ended {status.get('state')}: {json.dumps(status, indent=1)}\n{stack.logs()}")
        condition = {c["type"]: c for c in status.get("conditions", [])}.get("Failed", {})
        return status if status.get("state") == "Failed" and condition.get("reason") == "TrainerError" else None

    status = wait_for(failed, "the ForgeJob to fail with the trainer's error", 300, stack.logs)
    condition = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert f"s3://{BUCKET}/data/bad.jsonl:2:" in condition["message"], condition
    assert condition["message"].startswith("DataError on rank"), condition
    error = status["trainerError"]
    assert error["kind"] == "DataError" and error["exitCode"] == 3 and error["retryable"] is False
    assert "Restarting" not in {c["type"] for c in status["conditions"]}, "a permanent error was retried"
    job = client.CustomObjectsApi(stack.api).get_namespaced_custom_object(
        "kubeflow.org", "v1", stack.namespace, "pytorchjobs", status["pytorchJob"]
    )
    seen = {c["type"] for c in job["status"]["conditions"]}
    assert "Failed" in seen and "Restarting" not in seen, job["status"]


def replica_pids(stack: Stack, job: str, replica: str) -> list[int] | None:
    state_path = stack.workdir / "standin" / stack.namespace / job / "state.json"
    if not state_path.is_file():
        return None
    pids: list[int] = json.loads(state_path.read_text())["replicas"].get(replica, {}).get("pids") or []
    return pids or None


def condition_of(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_frozen_rank_is_stalled_restarted_and_the_run_resumes_to_success(drill_stack: Stack) -> None:
    stack, name = drill_stack, "stall"
    job = forgejob(name, "1e-4", 40)
    job["spec"]["eval"]["everySteps"] = 10
    # The hang watchdog is out of the way: this drill is about the operator's stall check.
    job["spec"]["monitoring"] = {"hangFloorSeconds": 3600, "maxStallRestarts": 2}
    # Test-only: rank 0 sleeps 0.4 s in each step, so that the run is still training past its first checkpoint when
    # the test looks (on an idle machine the 40 steps otherwise end within seconds).
    job["spec"]["env"].append({"name": "FORGE_FAULT_SLEEP_PER_STEP", "value": "0:0.4"})
    client.CustomObjectsApi(stack.api).create_namespaced_custom_object(GROUP, VERSION, stack.namespace, PLURAL, job)

    def past_first_checkpoint() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        done = [c["step"] for c in status.get("checkpoints") or [] if c.get("complete")]
        progress = status.get("progress") or {}
        ok = done and progress.get("phase") == "train" and progress.get("step", 0) > max(done)
        return status if ok else None

    wait_for(lambda: stack.scrape_trainers(name), "both trainer ranks to start", 120, stack.logs)  # + the operator
    wait_for(past_first_checkpoint, "a complete checkpoint and training past it", 300, stack.logs)
    pid = wait_for(lambda: replica_pids(stack, name, "worker-0"), "the worker's pid", 30, stack.logs)[0]
    os.kill(pid, signal.SIGSTOP)  # rank 1 stops answering; rank 0 waits in its next collective
    frozen_at = time.monotonic()
    try:

        def stalled() -> dict[str, Any] | None:
            status: dict[str, Any] = stack.forgejob(name).get("status") or {}
            progressing = condition_of(status, "Progressing")
            return status if progressing.get("reason") == "Stalled" and progressing.get("status") == "False" else None

        status = wait_for(stalled, "Progressing=False, reason Stalled", 240, stack.logs)
        detected_s = time.monotonic() - frozen_at
        message = condition_of(status, "Progressing")["message"]
        assert "phase train" in message and "kubectl logs" in message and f"{name}-master-0" in message, message
        wait_for(
            lambda: stack.query(f'max_over_time(forge_forgejob_stalled{{forge_job="{name}"}}[5m]) == 1'),
            "forge_forgejob_stalled = 1 in Prometheus",
            30,
            stack.logs,
        )
        restarted = wait_for(
            lambda: (stack.forgejob(name).get("status") or {}).get("stallRestarts"), "the stall restart", 60, stack.logs
        )
        assert restarted == 1
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or None, "the frozen rank to be stopped", 60, stack.logs)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)

    def progressing_again() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        return status if condition_of(status, "Progressing").get("status") == "True" else None

    wait_for(progressing_again, "Progressing=True after the restart", 240, stack.logs)
    recovered_s = time.monotonic() - frozen_at

    def finished() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        if status.get("state") in ("Failed", "EarlyStopped", "Invalid"):
            raise AssertionError(f"the run ended {status.get('state')}: {json.dumps(status, indent=1)}\n{stack.logs()}")
        return status if status.get("state") == "Succeeded" else None

    status = wait_for(finished, "the ForgeJob to succeed after the restart", 300, stack.logs)
    assert status["stallRestarts"] == 1 and status["progress"]["step"] == 40
    record = status["lastStallRestart"]
    assert {p["name"] for p in record["pods"]} == {f"{name}-master-0", f"{name}-worker-0"}
    # Both ranks resumed from the latest complete checkpoint at or before the last reported step.
    master_log = (stack.workdir / "standin" / stack.namespace / name / "master-0.log").read_text()
    resumed = [json.loads(line) for line in master_log.splitlines() if line.startswith('{"event": "resumed"')]
    assert resumed and resumed[-1]["step"] % 10 == 0 and resumed[-1]["step"] <= record["step"], resumed
    events = client.CoreV1Api(stack.api).list_namespaced_event(stack.namespace).items
    assert [e for e in events if e.reason == "Stalled"], "no Stalled Event"
    print(f"stall drill: fault -> Stalled {detected_s:.1f} s, fault -> Progressing again {recovered_s:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_slow_rank_is_named_a_straggler_with_its_pod_and_node(stack: Stack) -> None:
    name = "slow"
    job = forgejob(name, "1e-4", 40)
    spec = job["spec"]
    spec["eval"]["everySteps"] = 40
    spec["checkpoints"]["everySteps"] = 40
    spec["training"]["logEverySteps"] = 2
    spec["monitoring"] = {"slowReadBacks": 3}
    spec["env"].append({"name": "FORGE_FAULT_SLEEP_PER_STEP", "value": "1:0.5"})  # test-only: rank 1 sleeps each step
    client.CustomObjectsApi(stack.api).create_namespaced_custom_object(GROUP, VERSION, stack.namespace, PLURAL, job)
    wait_for(lambda: stack.scrape_trainers(name), "both trainer ranks to start", 120, stack.logs)
    started = time.monotonic()

    def degraded() -> dict[str, Any] | None:
        status: dict[str, Any] = stack.forgejob(name).get("status") or {}
        if status.get("state") in ("Failed", "EarlyStopped", "Invalid"):
            raise AssertionError(f"the run ended {status.get('state')}: {json.dumps(status, indent=1)}\n{stack.logs()}")
        condition = condition_of(status, "ThroughputDegraded")
        return status if (condition.get("status"), condition.get("reason")) == ("True", "Straggler") else None

    status = wait_for(degraded, "ThroughputDegraded=True, reason Straggler", 240, stack.logs)
    detected_s = time.monotonic() - started
    message = condition_of(status, "ThroughputDegraded")["message"]
    node = socket.gethostname()  # the stand-in's spec.nodeName
    assert message.startswith(f"rank 1 (pod {name}-worker-0, node {node}) takes "), message
    straggler = status["pace"]["straggler"]
    assert (straggler["rank"], straggler["pod"], straggler["node"]) == (1, f"{name}-worker-0", node), straggler
    assert straggler["stepSeconds"] >= 0.5 > straggler["medianSeconds"], straggler
    wait_for(
        lambda: stack.query(f'max_over_time(forge_trainer_straggler_rank{{forge_job="{name}", rank="1"}}[5m]) == 1'),
        "forge_trainer_straggler_rank = 1 for rank 1 in Prometheus",
        60,
        stack.logs,
    )
    events = client.CoreV1Api(stack.api).list_namespaced_event(stack.namespace).items
    assert [e for e in events if e.reason == "Straggler" and e.type == "Warning"], "no Straggler Event"
    print(f"straggler drill (end to end): ranks scraped -> ThroughputDegraded=True {detected_s:.1f} s")
