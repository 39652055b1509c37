"""Status reports: the pure patch builders, throttling/coalescing, and the sender against a real API server."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from forge_trainer.config import ForgeJobRef
from forge_trainer.evaluate import EvalResult, domain_gain_percent, forgetting_percent
from forge_trainer.report import (
    StatusReporter,
    baseline_status,
    checkpoint_entry,
    kube_patcher,
    latest_status,
    merge,
    phase_status,
    progress_status,
    status_patch,
)
from tests.faults import TcpProxy
from tests.trainer.harness import merged, run_ranks, write_config

BASE = EvalResult(0, 2.0, 3.0, None, None)


def test_forgetting_and_gain() -> None:
    assert forgetting_percent(3.0, 3.06) == pytest.approx(2.0)
    assert domain_gain_percent(2.0, 1.5) == pytest.approx(25.0)
    assert forgetting_percent(None, 3.0) is None and domain_gain_percent(2.0, None) is None
    ev = EvalResult.against(10, 1.5, 3.06, BASE)
    assert ev.forgetting_percent == pytest.approx(2.0) and ev.domain_gain_percent == pytest.approx(25.0)


def test_progress_and_latest_are_camel_case_and_rounded() -> None:
    assert progress_status(25, 100, 51200, 12.6, at="2025-01-01T00:00:00Z") == {
        "step": 25,
        "totalSteps": 100,
        "tokens": 51200,
        "percent": 25.0,
        "etaSeconds": 13,
        "phase": "train",
        "time": "2025-01-01T00:00:00Z",
    }
    paced = progress_status(
        25, 100, 51200, None, step_seconds=0.123456, report_interval_seconds=30.0, data_wait_percent=12.3456
    )
    assert paced["stepSeconds"] == 0.1235 and paced["reportIntervalSeconds"] == 30.0
    assert paced["dataWaitPercent"] == 12.35 and paced["etaSeconds"] is None
    assert phase_status("evaluate", at="2025-01-01T00:00:00Z") == {"phase": "evaluate", "time": "2025-01-01T00:00:00Z"}
    with pytest.raises(ValueError, match="unknown phase 'warmup'"):
        phase_status("warmup")
    latest = latest_status(EvalResult.against(10, 1.234567, 3.0912345, BASE), 1234.56789, None, 2.5e-5, 69.99)
    assert latest == {
        "domainLoss": 1.2346,
        "generalLoss": 3.0912,
        "forgettingPercent": 3.0412,
        "domainGainPercent": 38.2717,
        "tokensPerSecond": 1234.5679,
        "learningRate": 2.5e-05,
        "realisedDomainPercent": 69.99,
    }
    # Unknown figures are left out: null in a merge patch would erase the last value reported.
    assert latest_status(None, None, float("nan"), None, None) == {}


def test_latest_carries_the_kl_and_the_loss_of_each_general_source() -> None:
    base = EvalResult(0, 2.0, 3.0, None, None, general_source_losses=[2.0, 4.0])
    ev = EvalResult.against(10, 1.9, 3.2, base, 0.0123456, [2.2, None])
    latest = latest_status(ev, None, None, None, None, ["s3://g/chat/", "s3://g/code/"])
    assert latest["klBaseNats"] == 0.0123
    stderr = EvalResult.against(10, 1.9, 3.2, base, None, None, 0.015)
    assert stderr.forgetting_stderr_percent == pytest.approx(0.5)  # 0.015 / base general loss 3.0
    assert latest_status(stderr, None, None, None, None)["forgettingStderrPercent"] == 0.5
    assert checkpoint_entry(10, "s3://b/x", stderr)["forgettingStderrPercent"] == 0.5
    assert "forgettingStderrPercent" not in checkpoint_entry(10, "s3://b/x", ev)
    assert latest["generalSources"] == [
        {"uri": "s3://g/chat/", "loss": 2.2, "forgettingPercent": 10.0},
        {"uri": "s3://g/code/"},  # no labelled token in this source: nothing measured
    ]
    # A source list that does not match the measurement (a config change) reports nothing rather than mislabels.
    assert "generalSources" not in latest_status(ev, None, None, None, None, ["s3://g/only/"])


def test_checkpoint_entry_and_patch() -> None:
    entry = checkpoint_entry(200, "s3://b/run/step-00000200", EvalResult.against(200, 1.0, 3.3, BASE))
    assert entry == {
        "step": 200,
        "uri": "s3://b/run/step-00000200",
        "domainLoss": 1.0,
        "generalLoss": 3.3,
        "forgettingPercent": 10.0,
        "domainGainPercent": 50.0,
        "complete": True,
    }
    patch = status_patch(checkpoints=[entry], baseline=baseline_status(BASE), progress=None)
    assert patch == {"status": {"checkpoints": [entry], "baseline": {"domainLoss": 2.0, "generalLoss": 3.0}}}


def test_merge_coalesces_like_a_merge_patch() -> None:
    a = status_patch(progress={"step": 1, "etaSeconds": 9}, checkpoints=[{"step": 5}])
    b = status_patch(progress={"step": 2}, latest={"mfu": None})
    assert merge(a, b) == {
        "status": {"progress": {"step": 2, "etaSeconds": 9}, "checkpoints": [{"step": 5}], "latest": {"mfu": None}}
    }
    assert a["status"]["progress"]["step"] == 1  # inputs untouched


class Sink:
    """Records what the reporter sends; can be made to fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.down = False
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> None:
        if self.down:
            raise ConnectionError("API server unreachable")
        with self.lock:
            self.sent.append((time.monotonic(), body))


def test_reporter_throttles_and_never_loses_a_checkpoint() -> None:
    sink = Sink()
    rep = StatusReporter(lambda: sink, min_interval=0.3)
    checkpoints: list[dict[str, Any]] = []
    start = time.monotonic()
    for step in range(1, 41):
        rep.submit(status_patch(progress={"step": step}))
        if step % 10 == 0:
            checkpoints.append({"step": step})
            rep.submit(status_patch(checkpoints=list(checkpoints)))
        time.sleep(0.025)
    assert rep.close(timeout=5)
    elapsed = time.monotonic() - start
    times = [t for t, _ in sink.sent]
    assert len(times) <= elapsed / 0.3 + 2
    assert all(b - a >= 0.3 - 0.02 for a, b in itertools.pairwise(times[:-1]))
    last = sink.sent[-1][1]["status"]
    assert last["progress"] == {"step": 40}
    assert [c["step"] for c in last["checkpoints"]] == [10, 20, 30, 40]


def test_reporter_survives_an_outage_without_blocking() -> None:
    sink = Sink()
    rep = StatusReporter(lambda: sink, min_interval=0.05, max_backoff=0.2)
    sink.down = True
    worst = 0.0
    for step in range(30):
        t = time.monotonic()
        rep.submit(status_patch(progress={"step": step}, checkpoints=[{"step": 0}]))
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.02)
    assert rep.errors >= 2 and not sink.sent
    assert worst < 0.05
    sink.down = False
    assert rep.close(timeout=5)
    assert sink.sent[-1][1] == {"status": {"progress": {"step": 29}, "checkpoints": [{"step": 0}]}}


class RejectedError(Exception):
    """Like kubernetes.client.ApiException: carries the HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def test_reporter_drops_a_patch_the_api_rejects() -> None:
    sent: list[dict[str, Any]] = []
    calls = {"n": 0}

    def patch(body: dict[str, Any]) -> None:
        calls["n"] += 1
        if "earlyStop" in body["status"] and body["status"]["earlyStop"].get("reason") == "bad reason":
            raise RejectedError(422)
        if calls["n"] == 2:
            raise RejectedError(429)  # throttled: retried
        sent.append(body)

    rep = StatusReporter(lambda: patch, min_interval=0.01, max_backoff=0.05)
    rep.submit(status_patch(earlyStop={"reason": "bad reason"}))
    time.sleep(0.2)
    rep.submit(status_patch(progress={"step": 1}))
    time.sleep(0.2)
    rep.submit(status_patch(progress={"step": 2}))
    assert rep.close(timeout=5)
    assert rep.dropped == 1
    assert sent[-1] == {"status": {"progress": {"step": 2}}}
    assert all("earlyStop" not in b["status"] for b in sent)


# ---- against the real API server --------------------------------------------------------------------------------


def forgejob_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "forge.dev/v1alpha1",
        "kind": "ForgeJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": "s3://models/tiny/"},
            "technique": "cpt",
            "data": {"domainPercent": 100, "domain": [{"uri": "s3://acme/tickets/"}], "seqLength": 128},
            "training": {"maxSteps": 40, "microBatchSize": 2},
            "checkpoints": {"everySteps": 10, "output": "s3://acme/forge/x/"},
        },
    }


@pytest.fixture
def forgejob(cluster: Any, namespace: str) -> Iterator[ForgeJobRef]:
    from kubernetes import client

    with cluster.api_client() as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "forge.dev", "v1alpha1", namespace, "forgejobs", forgejob_body("report-test")
        )
    yield ForgeJobRef(namespace=namespace, name="report-test")


def read_status(cluster: Any, ref: ForgeJobRef) -> dict[str, Any]:
    from kubernetes import client

    with cluster.api_client() as api:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            ref.group, ref.version, ref.namespace, ref.plural, ref.name
        )
    status: dict[str, Any] = obj.get("status") or {}
    return status


@pytest.mark.timeout(120)
def test_sender_patches_a_real_forgejob_through_an_outage(
    cluster: Any, forgejob: ForgeJobRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    proxy = TcpProxy((host, int(port)))
    proxy.up()
    kubeconfig["clusters"][0]["cluster"]["server"] = f"https://{host}:{proxy.port}"
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    try:
        rep = StatusReporter(lambda: kube_patcher(forgejob), min_interval=1.0, max_backoff=2.0)
        base = EvalResult(0, 2.5, 3.5, None, None)
        rep.submit(status_patch(baseline=baseline_status(base)))
        for step in range(1, 21):
            rep.submit(status_patch(progress=progress_status(step, 40, step * 512, 40.0 - step)))
            time.sleep(0.1)
        deadline = time.monotonic() + 15
        while read_status(cluster, forgejob).get("progress", {}).get("step") != 20:
            assert time.monotonic() < deadline, read_status(cluster, forgejob)
            time.sleep(0.2)
        assert rep.sent <= 4  # 2 s of submissions at one patch per second at most (+ the first)

        proxy.down()
        ev = EvalResult.against(10, 2.0, 3.6, base)
        entry = checkpoint_entry(10, "s3://acme/forge/x/step-00000010", ev)
        t = time.monotonic()
        rep.submit(status_patch(checkpoints=[entry], latest=latest_status(ev, 1000.0, None, 1e-4, 70.0)))
        for step in range(21, 31):
            rep.submit(status_patch(progress=progress_status(step, 40, step * 512, 40.0 - step)))
            time.sleep(0.1)
        assert time.monotonic() - t < 2.0  # submitting never waited for the API
        deadline = time.monotonic() + 20
        while rep.errors < 1:
            assert time.monotonic() < deadline, "the outage was never noticed"
            time.sleep(0.1)
        proxy.up()  # the API server is reachable again on the same address
        assert rep.close(timeout=30)
    finally:
        proxy.down()
    status = read_status(cluster, forgejob)
    assert status["baseline"] == {"domainLoss": 2.5, "generalLoss": 3.5}
    progress = {k: v for k, v in status["progress"].items() if k != "time"}
    assert progress == {
        "step": 30,
        "totalSteps": 40,
        "tokens": 15360,
        "percent": 75.0,
        "etaSeconds": 10,
        "phase": "train",
    }
    assert status["checkpoints"] == [entry]
    assert status["latest"]["forgettingPercent"] == pytest.approx(2.8571)
    assert status["latest"]["learningRate"] == pytest.approx(1e-4)


def test_guard_status_is_accepted_by_the_crd_and_a_rejected_patch_is_dropped(
    cluster: Any, forgejob: ForgeJobRef
) -> None:
    from forge_operator.api import ForgeJobStatus
    from forge_trainer.guard import Verdict

    verdict = Verdict(
        9, "LearningRateTooHigh", "forgetting-budget", "lower learningRate to 9e-05", "rebalance", "9e-05", 75
    )
    rebalance = {"step": 9, "domainPercent": 75, "previousDomainPercent": 100, "reason": "LearningRateTooHigh: ..."}
    rep = StatusReporter(lambda: kube_patcher(forgejob), min_interval=0.1, max_backoff=0.5)
    rep.submit(status_patch(earlyStop=verdict.status(), rebalance=rebalance))
    time.sleep(1.0)
    rep.submit(status_patch(earlyStop={**verdict.status(), "reason": "not camel case"}))  # the CRD refuses it
    time.sleep(1.0)
    rep.submit(status_patch(progress=progress_status(10, 30, 100, None)))
    assert rep.close(timeout=15)
    assert rep.dropped == 1
    status = read_status(cluster, forgejob)
    assert status["earlyStop"] == verdict.status() and status["rebalance"] == rebalance
    assert status["progress"]["step"] == 10
    parsed = ForgeJobStatus.model_validate(status)
    assert parsed.early_stop is not None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_data_error_reaches_the_forgejob_status_with_file_and_line(
    cluster: Any, forgejob: ForgeJobRef, base_config: dict[str, Any], tmp_path: Path
) -> None:
    """The real trainer (2 ranks) meets garbage in a domain file: before exiting with the permanent data-error code
    it writes the cause, with file and line, to its ForgeJob's status on the real API server."""
    from forge_operator.api import ForgeJobStatus
    from forge_trainer.errors import EXIT_DATA

    bad = tmp_path / "bad" / "tickets.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "ticket 1: fine."}\n{"text": 5}\n' + '{"text": "ticket 2: fine."}\n' * 50)
    ref = {"namespace": forgejob.namespace, "name": forgejob.name}
    cfg = merged(base_config, data={"domain": [{"uri": str(bad)}], "maxBadLines": 0}, report={"forgeJob": ref})
    env = {"KUBECONFIG": str(cluster.kubeconfig)}
    results = run_ranks(write_config(tmp_path / "c.json", cfg), 2, tmp_path / "run", env=env, timeout=200)
    assert [r.returncode for r in results] == [EXIT_DATA, EXIT_DATA], "\n".join(r.describe() for r in results)
    error = read_status(cluster, forgejob)["trainerError"]
    assert error["kind"] == "DataError" and error["exitCode"] == EXIT_DATA and error["retryable"] is False
    assert error["message"].startswith(f"{bad}:2: 'text' must be a non-empty string")
    assert error["rank"] in (0, 1) and error["raisedAt"].startswith("forge_trainer/")
    assert ForgeJobStatus.model_validate(read_status(cluster, forgejob)).trainer_error is not None


def test_significant_patches_are_evaluations_checkpoints_and_events() -> None:
    from forge_trainer.report import eval_fingerprint, is_significant

    progress = status_patch(progress={"step": 7}, latest={"tokensPerSecond": 10.0})
    evaluated = status_patch(progress={"step": 8}, latest={"generalLoss": 2.1, "forgettingPercent": 1.5})
    assert not is_significant(progress, None)
    assert is_significant(evaluated, None)
    assert not is_significant(evaluated, eval_fingerprint(evaluated)), "the same figures again are not news"
    for key in ("checkpoints", "baseline", "earlyStop", "rebalance", "lrProbe", "trainerError", "pace"):
        assert is_significant(status_patch(**{key: {"x": 1}}), None), key
    # A phase other than train begins: the operator's stall limit changes with it, so it goes out at once.
    assert is_significant(status_patch(progress=phase_status("evaluate")), None)
    assert not is_significant(status_patch(progress={"step": 9, "phase": "train"}), None)


def test_progress_waits_for_the_interval_but_a_checkpoint_goes_out_at_once() -> None:
    sink = Sink()
    rep = StatusReporter(lambda: sink, min_interval=3600.0)
    try:
        rep.submit(status_patch(progress={"step": 1}))  # the first report goes out at once
        deadline = time.monotonic() + 30
        while not sink.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        rep.submit(status_patch(progress={"step": 2}, latest={"tokensPerSecond": 5.0}))
        rep.submit(status_patch(progress={"step": 3}, latest={"tokensPerSecond": 6.0}))
        rep.submit(status_patch(checkpoints=[{"step": 3, "uri": "s3://o/step-3/"}]))
        while len(sink.sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sink.sent) == 2, "the checkpoint did not bypass the hour-long interval"
        second = sink.sent[1][1]["status"]
        assert second["progress"] == {"step": 3}, "the pending progress rides along, coalesced"
        assert second["checkpoints"] == [{"step": 3, "uri": "s3://o/step-3/"}]
        rep.submit(status_patch(progress={"step": 4}))
        rep.submit(status_patch(progress={"step": 5}, latest={"generalLoss": 2.0}))  # a new evaluation
        while len(sink.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.sent[2][1]["status"]["latest"] == {"generalLoss": 2.0}
        rep.submit(status_patch(progress={"step": 6}))
        assert len(sink.sent) == 3
    finally:
        rep.close(timeout=5)
    assert sink.sent[-1][1]["status"]["progress"] == {"step": 6}, "close() flushes what the interval held back"


def test_the_default_interval_is_thirty_seconds() -> None:
    from forge_trainer.config import ReportSettings

    assert ReportSettings().min_interval_seconds == 30.0
