"""The other half of the contract: the status the trainer reports is kept, unpruned, by the ForgeJob CRD, and
the operator's models read it. The patches are built by the trainer's own report functions."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from forge_operator.api import ForgeJobStatus
from forge_operator.selection import select
from forge_trainer.candidates import CandidatePlan
from forge_trainer.config import TrainingSettings
from forge_trainer.evaluate import EvalResult
from forge_trainer.probe import ProbePoint, ProbeRecord, assess, choose
from forge_trainer.report import baseline_status, checkpoint_entry, latest_status, progress_status, status_patch
from tests.conftest import LocalCluster

FORGEJOB: dict[str, Any] = {
    "apiVersion": "forge.dev/v1alpha1",
    "kind": "ForgeJob",
    "metadata": {"name": "reported"},
    "spec": {
        "model": {"base": "s3://models/llama-3.2-1b/"},
        "technique": "sft",
        "data": {"domain": [{"uri": "s3://acme/d/"}], "general": [{"uri": "s3://acme/g/"}]},
        "checkpoints": {"output": "s3://acme/o/"},
    },
}


def trainer_patch() -> dict[str, Any]:
    base = EvalResult(0, 2.0, 1.6, None, None, general_source_losses=[1.5, 1.7])
    early = EvalResult.against(100, 1.8, 1.61, base, 0.012, [1.51, 1.71])
    late = EvalResult.against(200, 1.5, 1.7, base, 0.0456, [1.55, 1.85])
    blend = EvalResult.against(200, 1.62, 1.63, base, 0.02)
    average = EvalResult.against(200, 1.6, 1.65, base, 0.03)
    return status_patch(
        baseline=baseline_status(base),
        progress=progress_status(200, 400, 52_428_800, 311.7),
        latest=latest_status(late, 48_123.25, 0.351, 1.7e-5, 79.8, ["s3://acme/g/chat/", "s3://acme/g/code/"]),
        checkpoints=[
            checkpoint_entry(100, "s3://acme/o/step-00000100/", early),
            checkpoint_entry(200, "s3://acme/o/step-00000200/", late),
            {
                **checkpoint_entry(200, "s3://acme/o/candidates/average-last2-step-00000200", average),
                **CandidatePlan("average", 200, average_of=(100, 200)).status_fields(),
            },
            {
                **checkpoint_entry(200, "s3://acme/o/candidates/interpolation-5000-step-00000200", blend),
                **CandidatePlan("interpolation", 200, alpha=0.5).status_fields(),
            },
        ],
    )


def test_trainer_status_report_round_trips_through_the_crd(cluster: LocalCluster, namespace: str) -> None:
    patch = trainer_patch()
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", FORGEJOB)
        written = custom.patch_namespaced_custom_object_status(
            "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", patch
        )
    assert written["status"] == patch["status"], "the CRD pruned or changed part of the trainer's report"
    status = ForgeJobStatus.model_validate(written["status"])
    assert status.progress is not None and status.progress.step == 200
    assert status.latest is not None and status.latest.kl_base_nats == 0.0456
    sources = status.latest.general_sources or []
    assert [(s.uri, s.loss, s.forgetting_percent) for s in sources] == [
        ("s3://acme/g/chat/", 1.55, 3.3333),
        ("s3://acme/g/code/", 1.85, 8.8235),
    ]
    # 200 forgets 6.25% > 2%; the interpolation (1.875%) beats checkpoint 100 (0.625%) on domain gain (19% vs 10%).
    selected = select(status.checkpoints, status.baseline, "best-within-budget", 2).selected
    assert selected is not None and (selected.kind, selected.alpha, selected.step) == ("interpolation", 0.5, 200)
    assert "interpolation (alpha 0.5) of step 200" in selected.reason
    without = [c for c in status.checkpoints if c.kind is None]
    selected = select(without, status.baseline, "best-within-budget", 2).selected
    assert selected is not None and selected.step == 100


def test_reports_without_evaluation_are_accepted(cluster: LocalCluster, namespace: str) -> None:
    patch = status_patch(
        progress=progress_status(3, 400, 1000, None),
        latest=latest_status(None, None, None, None, None),
        checkpoints=[checkpoint_entry(3, "s3://acme/o/step-00000003/", None)],
    )
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", FORGEJOB)
        written = custom.patch_namespaced_custom_object_status(
            "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", patch
        )
    status = ForgeJobStatus.model_validate(written["status"])
    assert [c.step for c in status.checkpoints] == [3]
    selected = select(status.checkpoints, status.baseline, "best-within-budget", 2).selected
    assert selected is not None and "no checkpoint has evaluation metrics" in selected.reason


# The guard's reports, in the shapes agreed for issue 5 (docs/user-guide.md, "Status"). forge_trainer.report has no
# builders for them yet: when it grows them, build these patches with them, as trainer_patch() does above.
GUARD_REPORT: dict[str, Any] = {
    "status": {
        "earlyStop": {
            "step": 420,
            "reason": "ForgettingBudgetExceeded",
            "rule": "forgetting-budget",
            "message": "forgetting 3.1% > budget 2% for 3 evaluations",
            "action": "rebalance",
            "suggestion": {"learningRate": "1e-5", "domainPercent": 50},
        },
        "rebalance": {
            "step": 420,
            "domainPercent": 50,
            "previousDomainPercent": 75,
            "reason": "forgetting 3.1% > budget 2%",
        },
        "checkpoints": [
            {"step": 400, "uri": "s3://acme/o/step-00000400/", "forgettingPercent": 1.9, "domainGainPercent": 20.0},
            {
                "step": 400,
                "uri": "s3://acme/o/step-00000400-wise-0.5/",
                "kind": "interpolation",
                "alpha": 0.5,
                "forgettingPercent": 0.8,
                "domainGainPercent": 14.0,
                "complete": True,
            },
            {
                "step": 400,
                "uri": "s3://acme/o/average-00000300-00000400/",
                "kind": "average",
                "averageOf": [300, 400],
                "forgettingPercent": 1.5,
                "domainGainPercent": 21.0,
                "complete": True,
            },
        ],
    }
}


def test_guard_reports_and_candidates_round_trip_through_the_crd(cluster: LocalCluster, namespace: str) -> None:
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", FORGEJOB)
        written = custom.patch_namespaced_custom_object_status(
            "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", GUARD_REPORT
        )
    assert written["status"] == GUARD_REPORT["status"], "the CRD pruned or changed part of the guard's report"
    status = ForgeJobStatus.model_validate(written["status"])
    assert status.early_stop is not None and status.early_stop.suggestion is not None
    assert status.rebalance is not None and status.rebalance.domain_percent == 50
    selected = select(status.checkpoints, status.baseline, "best-within-budget", 2).selected
    assert selected is not None and (selected.kind, selected.average_of) == ("average", [300, 400])


def test_an_unknown_reason_is_kept_but_a_malformed_one_is_refused(cluster: LocalCluster, namespace: str) -> None:
    """Reasons are open (a newer trainer may add one) but must be CamelCase words; actions are an enum."""
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", FORGEJOB)

        def patch(early_stop: dict[str, Any]) -> dict[str, Any]:
            result: dict[str, Any] = custom.patch_namespaced_custom_object_status(
                "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", {"status": {"earlyStop": early_stop}}
            )
            return result

        assert (
            patch({"reason": "EvalLossPlateau", "action": "warn"})["status"]["earlyStop"]["reason"] == "EvalLossPlateau"
        )
        for bad in ({"reason": "loss diverged"}, {"reason": "LossDiverged", "action": "pause"}):
            with pytest.raises(ApiException) as error:
                patch(bad)
            assert error.value.status == 422


def probe_report() -> dict[str, Any]:
    """status.lrProbe as the trainer builds it: three multiples, the highest one with a non-finite loss."""
    training = TrainingSettings.model_validate(
        {"learningRate": 2e-5, "microBatchSize": 4, "maxSteps": 400, "warmupSteps": 12, "probe": {"steps": 20}}
    )
    low = (ProbePoint(10, 1e-4, 0.05, 2.0), ProbePoint(20, 2e-4, 0.11, 3.5))
    high = (ProbePoint(10, 4e-4, 0.4, 5.0), ProbePoint(20, 8e-4, 0.9, 8.0))
    results = (
        assess(0.5, training, low, True, 3.2),
        assess(2.0, training, high, True, 3.1),
        assess(8.0, training, high[:1], False, 1.0),
    )
    record = ProbeRecord(2e-5, 2.0, 20, results, choose(results, 2.0))
    return status_patch(lrProbe=record.status())


def test_the_learning_rate_probe_report_round_trips_through_the_crd(cluster: LocalCluster, namespace: str) -> None:
    patch = probe_report()
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", FORGEJOB)
        written = custom.patch_namespaced_custom_object_status(
            "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", patch
        )
    assert written["status"] == patch["status"], "the CRD pruned or changed part of the probe's report"
    probe = ForgeJobStatus.model_validate(written["status"]).lr_probe
    assert probe is not None
    # each multiple's own line through (0, 0), projected over the run's 400 cosine steps: 0.5x at 1.1%, 2x at 9%
    assert [m.multiplier for m in probe.multiples] == [0.5, 2.0, 8.0]
    assert probe.multiples[2].projected_forgetting_percent is None, "a non-finite probe run has no projection"
    assert probe.multiples[2].measured_forgetting_percent == 0.4
    chosen = max(
        m.multiplier
        for m in probe.multiples
        if m.projected_forgetting_percent is not None and m.projected_forgetting_percent <= 2.0
    )
    assert (probe.multiplier, probe.learning_rate) == (chosen, pytest.approx(2e-5 * chosen))
    assert "highest multiple projected within the forgetting budget" in probe.reason


def test_the_pace_report_round_trips_through_the_crd_and_clears_with_null(
    cluster: LocalCluster, namespace: str
) -> None:
    from forge_trainer.pace import Degraded, Findings, Peer, pace_status

    straggler = Degraded("Straggler", "slow", rank=1, value=0.5123, median=0.0121, read_backs=5)
    drop = Degraded("ThroughputDrop", "low", value=1200.04, median=3000.0, read_backs=5)
    peers = [Peer("bot-master-0", "gpu-1"), Peer("bot-worker-0", "gpu-7")]
    named = status_patch(pace=pace_status(Findings(straggler, drop), 2, peers, 40, "2026-01-01T00:00:00Z"))
    cleared = status_patch(pace=pace_status(Findings(), 2, peers, 60, "2026-01-01T00:01:00Z"))
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object("forge.dev", "v1alpha1", namespace, "forgejobs", FORGEJOB)
        written = custom.patch_namespaced_custom_object_status(
            "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", named
        )
        assert written["status"] == named["status"], "the CRD pruned or changed part of the pace report"
        pace = ForgeJobStatus.model_validate(written["status"]).pace
        assert pace is not None and pace.straggler is not None and pace.throughput_drop is not None
        assert (pace.straggler.rank, pace.straggler.pod, pace.straggler.node) == (1, "bot-worker-0", "gpu-7")
        written = custom.patch_namespaced_custom_object_status(
            "forge.dev", "v1alpha1", namespace, "forgejobs", "reported", cleared
        )
    assert written["status"]["pace"] == {"ranks": 2, "step": 60, "time": "2026-01-01T00:01:00Z"}
