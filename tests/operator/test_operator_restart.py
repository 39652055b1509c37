"""The operator killed mid-job and restarted: nothing duplicated, nothing lost, work done while it was down."""

from __future__ import annotations

from typing import Any

from forge_operator.api import ForgeJobSpec
from forge_operator.defaults import resolve
from forge_operator.render import Owner, RenderOptions, build_config_map, build_service_account
from tests.operator.helpers import Kube, OperatorProcess, TrainingOperatorStatus, forgejob, wait_for

CHECKPOINTS = {
    "baseline": {"domainLoss": 2.0, "generalLoss": 1.5},
    "checkpoints": [
        {"step": 100, "uri": "s3://acme/forge/r2/step-00000100/", "forgettingPercent": 0.5, "domainGainPercent": 8.0},
        {"step": 200, "uri": "s3://acme/forge/r2/step-00000200/", "forgettingPercent": 1.5, "domainGainPercent": 14.0},
    ],
}


def owned_children(kube: Kube, namespace: str, name: str) -> dict[str, list[str]]:
    """uids of every object labelled as a child of ``name``, by kind (duplicates would show as extra uids)."""
    selector = f"forge.dev/forgejob={name}"
    return {
        "ConfigMap": [
            o.metadata.uid for o in kube.core.list_namespaced_config_map(namespace, label_selector=selector).items
        ],
        "ServiceAccount": [
            o.metadata.uid for o in kube.core.list_namespaced_service_account(namespace, label_selector=selector).items
        ],
        "Role": [o.metadata.uid for o in kube.rbac.list_namespaced_role(namespace, label_selector=selector).items],
        "RoleBinding": [
            o.metadata.uid for o in kube.rbac.list_namespaced_role_binding(namespace, label_selector=selector).items
        ],
        "PyTorchJob": [
            j["metadata"]["uid"]
            for j in kube.pytorchjobs(namespace)
            if j["metadata"]["labels"].get("forge.dev/forgejob") == name
        ],
    }


def complete(children: dict[str, list[str]]) -> dict[str, list[str]] | None:
    return children if all(len(uids) == 1 for uids in children.values()) else None


def test_operator_killed_and_restarted_mid_job(kube: Kube, operator_process: OperatorProcess, namespace: str) -> None:
    for name in ("r1", "r2"):
        kube.create_forgejob(namespace, forgejob(name))
    before: dict[str, dict[str, list[str]]] = {}
    for name in ("r1", "r2"):
        before[name] = wait_for(
            lambda name=name: complete(owned_children(kube, namespace, name)),
            what=f"{name}'s children",
            context=operator_process.log_tail,
        )
    r1 = TrainingOperatorStatus(kube, namespace, "r1")
    r1.created()
    r1.running()
    wait_for(lambda: kube.state(namespace, "r1") == "Running", what="r1 Running", context=operator_process.log_tail)
    status_before = {name: kube.forgejob(namespace, name)["status"] for name in ("r1", "r2")}

    operator_process.kill()

    # While the operator is down: r1 finishes, r2's trainer reports checkpoints and the user suspends it, a new
    # ForgeJob r3 arrives whose first reconcile was cut short after two of its five children.
    r1.succeeded()
    kube.patch_forgejob_status(namespace, "r2", {"status": CHECKPOINTS})
    kube.patch_forgejob(namespace, "r2", {"spec": {"suspend": True}})
    r3 = kube.create_forgejob(namespace, forgejob("r3"))
    owner = Owner("r3", namespace, r3["metadata"]["uid"])
    spec = ForgeJobSpec.model_validate(r3["spec"])
    options = RenderOptions(trainer_image="registry.example/forge-trainer:test")
    early_config = kube.core.create_namespaced_config_map(
        namespace, build_config_map(owner, spec, resolve(spec), options)
    )
    early_account = kube.core.create_namespaced_service_account(namespace, build_service_account(owner))

    operator_process.start()

    wait_for(lambda: kube.state(namespace, "r1") == "Succeeded", what="r1 Succeeded", context=operator_process.log_tail)
    wait_for(
        lambda: (kube.forgejob(namespace, "r2")["status"].get("selected") or {}).get("step") == 200,
        what="r2 selected step 200",
        context=operator_process.log_tail,
    )
    wait_for(
        lambda: (kube.pytorchjob(namespace, "r2") or {})["spec"]["runPolicy"]["suspend"] is True,
        what="r2's PyTorchJob suspended",
        context=operator_process.log_tail,
    )
    r3_children = wait_for(
        lambda: complete(owned_children(kube, namespace, "r3")),
        what="r3's children",
        context=operator_process.log_tail,
    )
    assert r3_children["ConfigMap"] == [early_config.metadata.uid], "the half-done reconcile's ConfigMap was adopted"
    assert r3_children["ServiceAccount"] == [early_account.metadata.uid]
    wait_for(lambda: kube.state(namespace, "r3") == "Pending", what="r3 Pending")

    for name in ("r1", "r2"):
        assert owned_children(kube, namespace, name) == before[name], f"{name}'s children changed or duplicated"
        status: dict[str, Any] = kube.forgejob(namespace, name)["status"]
        assert status["resolved"] == status_before[name]["resolved"]
        assert status["pytorchJob"] == name
        accepted = next(c for c in status["conditions"] if c["type"] == "Accepted")
        accepted_before = next(c for c in status_before[name]["conditions"] if c["type"] == "Accepted")
        assert accepted["lastTransitionTime"] == accepted_before["lastTransitionTime"]
    r1_status = kube.forgejob(namespace, "r1")["status"]
    running = next(c for c in r1_status["conditions"] if c["type"] == "Running")
    running_before = next(c for c in status_before["r1"]["conditions"] if c["type"] == "Running")
    assert running["status"] == "False" and running_before["status"] == "True"
    assert kube.forgejob(namespace, "r2")["status"]["observedGeneration"] == 2
