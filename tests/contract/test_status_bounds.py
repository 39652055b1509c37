"""status.checkpoints is bounded without changing what selection can choose, and the largest status the trainer and
operator can write is accepted by the real API server, far below its object size limit."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from forge_operator.api import (
    CONDITION_MESSAGE_MAX,
    STATUS_CHECKPOINTS_MAX,
    STATUS_TEXT_MAX,
    URI_MAX,
    CheckpointReport,
    ForgeJobStatus,
)
from forge_operator.selection import select
from forge_trainer.report import STATUS_CHECKPOINTS_LIMIT, bounded_checkpoints, checkpoint_status, pareto_entries
from tests.conftest import LocalCluster

GROUP, VERSION, PLURAL = "forge.dev", "v1alpha1", "forgejobs"
OBJECT_LIMIT_BYTES = 1_572_864  # etcd's default request limit, which bounds every Kubernetes object


def long_run(saves: int, seed: int, uri_length: int = 40) -> list[dict[str, Any]]:
    """A long run's reports: gain and forgetting drift up with noise, then 17 end-of-run candidates."""
    rng = random.Random(seed)
    entries: list[dict[str, Any]] = []
    for n in range(1, saves + 1):
        step = 50 * n
        entries.append(
            {
                "step": step,
                "uri": f"s3://b/{'p' * max(0, uri_length - 20)}/step-{step:08d}/"[:uri_length],
                "domainGainPercent": round(30 * (1 - 1 / (1 + n / 40)) + rng.gauss(0, 1.5), 4),
                "forgettingPercent": round(n / 60 + rng.gauss(0, 0.6), 4),
                "forgettingStderrPercent": round(abs(rng.gauss(0.3, 0.15)), 4),
                "complete": True,
            }
        )
    last = entries[-1]["step"]
    entries.append(
        {"step": last, "uri": "s3://b/avg/", "kind": "average", "averageOf": [last - 100, last - 50, last]}
        | {"domainGainPercent": 20.0, "forgettingPercent": 1.0, "forgettingStderrPercent": 0.2}
    )
    for alpha in range(1, 17):
        entries.append(
            {"step": last, "uri": f"s3://b/interp-{alpha}/", "kind": "interpolation", "alpha": alpha / 17}
            | {"domainGainPercent": 20.0 * alpha / 17, "forgettingPercent": 2.0 * alpha / 17}
        )
    return entries


def test_short_lists_are_reported_whole() -> None:
    entries = long_run(40, seed=1)
    assert len(entries) <= STATUS_CHECKPOINTS_LIMIT
    assert checkpoint_status(entries) == {"checkpoints": entries}


def test_long_lists_keep_candidates_newest_and_front_and_count_the_rest() -> None:
    entries = long_run(600, seed=2)
    kept, omitted = bounded_checkpoints(entries)
    assert len(kept) == STATUS_CHECKPOINTS_LIMIT == STATUS_CHECKPOINTS_MAX
    assert [e for e in kept if "kind" in e] == [e for e in entries if "kind" in e]  # every candidate
    plain = [e for e in entries if "kind" not in e]
    assert all(e in kept for e in plain[-16:])  # the newest saves
    assert [e["step"] for e in kept] == sorted(e["step"] for e in kept)  # still in report order
    assert omitted is not None and omitted["count"] == len(entries) - len(kept)
    dropped = [e["step"] for e in entries if e not in kept]
    assert (omitted["firstStep"], omitted["lastStep"]) == (min(dropped), max(dropped))

    # Every entry on the measured front (domain gain vs forgetting) is kept: any budget's choice is one of them.
    def dominated(e: dict[str, Any]) -> bool:
        return any(
            o["domainGainPercent"] >= e["domainGainPercent"]
            and o["forgettingPercent"] <= e["forgettingPercent"]
            and (o["domainGainPercent"], o["forgettingPercent"]) != (e["domainGainPercent"], e["forgettingPercent"])
            for o in entries
        )

    measured_front = [e for e in entries if not dominated(e)]
    assert measured_front and all(e in kept for e in measured_front)
    assert set(map(id, measured_front)) <= set(map(id, pareto_entries(entries)))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_selection_on_the_bounded_list_equals_selection_on_the_whole_run(seed: int) -> None:
    entries = long_run(400, seed=seed)
    kept, _ = bounded_checkpoints(entries)
    whole = [CheckpointReport.model_validate(e) for e in entries]
    bounded = [CheckpointReport.model_validate(e) for e in kept]
    compared = 0
    for policy in ("best-within-budget", "pareto", "last"):
        for budget in (0.5, 1.0, 2.0, 3.0, 5.0, 8.0):
            for confidence in (50, 80, 95, 99):
                full = select(whole, None, policy, budget, confidence).selected  # type: ignore[arg-type]
                small = select(bounded, None, policy, budget, confidence).selected  # type: ignore[arg-type]
                assert full is not None and small is not None
                assert (small.uri, small.step, small.kind) == (full.uri, full.step, full.kind), (
                    policy,
                    budget,
                    confidence,
                )
                compared += 1
    assert compared == 72


def largest_status() -> dict[str, Any]:
    """Every bounded list at its limit and every bounded string at its length: the largest status Forge writes."""
    entries = long_run(600, seed=6, uri_length=URI_MAX)
    for e in entries:
        if e.get("kind") == "average":
            e["averageOf"] = list(range(100))
    status = checkpoint_status(entries)
    text = "x" * STATUS_TEXT_MAX
    checkpoints = status["checkpoints"]
    refs = [{k: e[k] for k in ("step", "uri", "kind", "alpha", "averageOf") if k in e} for e in checkpoints]
    conditions = [
        {
            "type": f"Condition{i}",
            "status": "True",
            "reason": "R" * 1024,
            "message": "m" * CONDITION_MESSAGE_MAX,
            "lastTransitionTime": "2026-12-05T00:00:00Z",
        }
        for i in range(32)
    ]
    return {
        **status,
        "conditions": conditions,
        "earlyStop": {"step": 1, "reason": "R" * 128, "rule": "r" * 128, "message": "m" * 32_768},
        "rebalance": {"step": 1, "domainPercent": 50, "reason": "r" * 32_768},
        "selected": {**refs[0], "policy": "pareto", "reason": text},
        "paretoFront": refs,
        "resolved": {
            "learningRate": "1" * 64,
            "learningRateSource": "auto",
            "learningRateWhy": text,
            "minLearningRate": "1" * 64,
            "worldSize": 64,
            "microBatchSize": 1,
            "gradientAccumulationSteps": 1,
            "globalBatchTokens": 1,
            "globalBatchSequences": 1,
            "warmupSteps": 1,
            "totalTokens": 1,
            "notes": [text] * 16,
        },
    }


def create(cluster: LocalCluster, namespace: str, name: str) -> client.CustomObjectsApi:
    api = client.CustomObjectsApi(cluster.api_client())
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ForgeJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": "s3://models/m/"},
            "technique": "cpt",
            "data": {"domain": [{"uri": "s3://a/d/"}], "general": [{"uri": "s3://a/g/"}]},
            "checkpoints": {"output": "s3://a/o/"},
        },
    }
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return api


def test_the_largest_status_is_accepted_and_far_below_the_object_limit(cluster: LocalCluster, namespace: str) -> None:
    status = largest_status()
    ForgeJobStatus.model_validate(status)  # the operator reads it back
    api = create(cluster, namespace, "largest")
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "largest", {"status": status})
    stored = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "largest")
    assert len(stored["status"]["checkpoints"]) == STATUS_CHECKPOINTS_MAX
    assert stored["status"]["checkpointsOmitted"]["count"] > 0
    size = len(json.dumps(stored).encode())
    print(f"largest ForgeJob: {size / 1024:.1f} KiB of the {OBJECT_LIMIT_BYTES // 1024} KiB object limit")
    assert size < OBJECT_LIMIT_BYTES * 2 // 3  # room for metadata, the spec and the annotations that copy it


def test_the_api_server_refuses_a_list_over_its_bound(cluster: LocalCluster, namespace: str) -> None:
    entries = long_run(STATUS_CHECKPOINTS_MAX + 1, seed=7)[: STATUS_CHECKPOINTS_MAX + 1]
    api = create(cluster, namespace, "overlong")
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, "overlong", {"status": {"checkpoints": entries}}
        )
    assert refused.value.status == 422 and "checkpoints" in str(refused.value.body)
    kept, _ = bounded_checkpoints(entries)
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "overlong", {"status": {"checkpoints": kept}}
    )
