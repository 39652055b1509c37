"""Pure helpers: the environment a replica's process gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge_dev.standin.environment import (
    PodFields,
    Rendezvous,
    base_environment,
    checkpoint_dir_environment,
    command_line,
    container_environment,
    expand,
    field_ref_value,
    kubeflow_environment,
    process_environment,
)
from forge_dev.standin.references import ReplicaStartError, StaticObjectSource
from forge_dev.standin.spec import Container
from forge_dev.standin.volumes import MountMapping, PathRewriter

pytestmark = pytest.mark.timeout(30)

POD = PodFields(
    name="job-worker-1",
    namespace="team",
    uid="u-1",
    service_account="trainer",
    labels={"training.kubeflow.org/replica-type": "worker", "app": "forge"},
    annotations={"note": "hi"},
    node_name="node-a",
)
SOURCE = StaticObjectSource(
    config_maps={"cfg": {"level": b"debug", "path": b"/etc/forge/config.json", "bad key": b"x"}},
    secrets={"creds": {"token": b"s3cret"}},
)


def _container(**fields: object) -> Container:
    return Container.model_validate({"name": "pytorch", **fields})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("a$b", "a$b"),
        ("$(A", "$(A"),
        ("end$", "end$"),
        ("$(A)$(B)", "12"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "2"}) == expected


def test_base_environment_drops_in_cluster_and_distributed_variables_and_prefixes_path() -> None:
    env = base_environment(
        {
            "PATH": "/usr/bin:/venv/bin",
            "HOME": "/root",
            "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_PORT_443_TCP": "tcp://10.0.0.1:443",
            "KUBECONFIG": "/admin",
            "RANK": "7",
            "PET_NNODES": "9",
        },
        ["/venv/bin"],
    )
    assert env == {"PATH": "/venv/bin:/usr/bin", "HOME": "/root"}


def test_kubeflow_environment_for_a_local_rank() -> None:
    env = dict(
        kubeflow_environment(
            Rendezvous(master_port=2345, world_size=6, nnodes=3, node_rank=2, nproc_per_node=2, local_rank=1)
        )
    )
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "2345",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": "2345",
        "WORLD_SIZE": "6",
        "RANK": "5",
        "PET_NNODES": "3",
        "PET_NODE_RANK": "2",
        "PET_NPROC_PER_NODE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }


def test_container_environment_resolves_references_in_kubelet_order() -> None:
    container = _container(
        envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        env=[
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {
                "name": "ROLE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['training.kubeflow.org/replica-type']"}},
            },
            {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
            {"name": "COMBINED", "value": "$(LEVEL)-$(POD)-$(LATER)"},
            {"name": "LATER", "value": "late"},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        ],
    )
    env = container_environment(container, SOURCE, POD)
    assert env == {
        "CFG_level": "debug",
        "CFG_path": "/etc/forge/config.json",
        "LEVEL": "debug",
        "TOKEN": "s3cret",
        "POD": "job-worker-1",
        "NS": "team",
        "ROLE": "worker",
        "NOTE": "hi",
        "COMBINED": "debug-job-worker-1-$(LATER)",
        "LATER": "late",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}],
            'configmap "absent" not found',
        ),
        ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope"}}}], "couldn't find key nope"),
        ([{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}], "not supported"),
        ([{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}], "not supported"),
    ],
)
def test_unresolvable_references_keep_the_replica_waiting(env: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ReplicaStartError, match=message):
        container_environment(_container(env=env), SOURCE, POD)


def test_field_ref_pod_addresses_are_loopback() -> None:
    assert field_ref_value("status.podIP", POD) == "127.0.0.1"
    assert field_ref_value("spec.serviceAccountName", POD) == "trainer"
    assert field_ref_value("spec.nodeName", POD) == "node-a"
    assert field_ref_value("metadata.labels['missing']", POD) == ""


def test_command_line_expands_variables_then_rewrites_paths() -> None:
    container = _container(command=["forge-trainer"], args=["--config", "$(CONFIG)", "--rank=$(RANK)", "$$(RANK)"])

    def rewrite(text: str) -> str:
        return text.replace("/etc/forge", "/local/cfg")

    argv = command_line(container, {"CONFIG": "/etc/forge/config.json", "RANK": "3"}, rewrite)
    assert argv == ["forge-trainer", "--config", "/local/cfg/config.json", "--rank=3", "$(RANK)"]


def test_command_line_requires_a_command() -> None:
    with pytest.raises(ReplicaStartError, match="no command"):
        command_line(_container(args=["--x"]), {}, lambda text: text)


def test_process_environment_layers_and_kubeconfig() -> None:
    env = process_environment(
        base={"PATH": "/bin", "KEEP": "1"},
        container_env={"DATA": "/data/x", "RANK": "99"},
        injected=[("RANK", "0")],
        rewrite=lambda text: text.replace("/data", "/tmp/d"),
        kubeconfig="/tmp/kc",
    )
    assert env == {"PATH": "/bin", "KEEP": "1", "DATA": "/tmp/d/x", "RANK": "0", "KUBECONFIG": "/tmp/kc"}


def test_each_replica_stages_checkpoints_in_its_own_scratch_folder() -> None:
    def scratch_of(replica: str) -> PathRewriter:
        return PathRewriter([MountMapping("/tmp/forge", Path(f"/w/{replica}/volumes/scratch"))])

    master = checkpoint_dir_environment({}, scratch_of("a/master-0"), "/w/a/master-0")
    other_job = checkpoint_dir_environment({}, scratch_of("b/master-0"), "/w/b/master-0")
    assert master == {"FORGE_CHECKPOINT_LOCAL_DIR": "/w/a/master-0/volumes/scratch/checkpoints"}
    assert other_job == {"FORGE_CHECKPOINT_LOCAL_DIR": "/w/b/master-0/volumes/scratch/checkpoints"}
    # no scratch mount: a folder of the replica's own; the container's own value is left alone
    unmounted = checkpoint_dir_environment({}, PathRewriter([]), "/w/a/worker-1/")
    assert unmounted == {"FORGE_CHECKPOINT_LOCAL_DIR": "/w/a/worker-1/scratch-checkpoints"}
    assert checkpoint_dir_environment({"FORGE_CHECKPOINT_LOCAL_DIR": "/x"}, scratch_of("a"), "/w/a") == {}
