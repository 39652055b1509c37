"""The stand-in against the real local control plane and Kubeflow's PyTorchJob CRD, with real local processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.conftest import LocalCluster, uses_real_kubeflow_crd
from tests.standin.conftest import (
    GROUP,
    PLURAL,
    VERSION,
    Harness,
    condition,
    conditions,
    pid_alive,
    replica_spec,
    template,
    wait_until,
)


def _active(job: dict[str, Any], rtype: str) -> int:
    return int(((job.get("status") or {}).get("replicaStatuses") or {}).get(rtype, {}).get("active", 0))


def _state(harness: Harness, job: str) -> dict[str, Any]:
    path = harness.workdir / harness.namespace / job / "state.json"
    loaded: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return loaded


@pytest.mark.timeout(60)
def test_master_and_worker_run_with_kubeflow_env_then_succeed(standin: Harness) -> None:
    out = standin.out
    history = standin.history("train")
    master = template(["--out", str(out), "--wait-for", str(out / "release")])
    worker = template(["--out", str(out), "--sleep"])
    created = standin.create_job("train", {"Master": replica_spec(master), "Worker": replica_spec(worker)})
    stored_container = created["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert stored_container["args"] == master["spec"]["containers"][0]["args"]  # accepted, nothing pruned

    running = standin.wait_job(
        "train",
        lambda job: conditions(job).get("Running") == "True" and _active(job, "Master") == _active(job, "Worker") == 1,
        "Running with one active Master and one active Worker",
    )
    assert condition(running, "Running")["reason"] == "PyTorchJobRunning"
    assert running["status"]["startTime"] and "completionTime" not in running["status"]

    records = {rank: standin.record(rank) for rank in (0, 1)}
    for rank, record in records.items():
        env = record["env"]
        assert env["RANK"] == str(rank) and env["PET_NODE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "2" and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1"
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "127.0.0.1"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == records[0]["env"]["MASTER_PORT"]
        assert env["LOCAL_RANK"] == "0" and env["PYTHONUNBUFFERED"] == "1"
        assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
        assert not any(name.startswith("KUBERNETES_SERVICE") for name in env)
        assert Path(env["KUBECONFIG"]).is_file()
    assert int(records[0]["env"]["MASTER_PORT"]) > 0
    assert records[0]["cwd"] == str(standin.workdir / standin.namespace / "train" / "master-0")
    worker_pid = records[1]["pid"]
    assert pid_alive(worker_pid)

    (out / "release").write_text("go")
    done = standin.wait_condition("train", "Succeeded")
    assert conditions(done) == {"Created": "True", "Running": "False", "Succeeded": "True"}
    succeeded = condition(done, "Succeeded")
    assert succeeded["reason"] == "PyTorchJobSucceeded"
    assert succeeded["message"] == "PyTorchJob train is successfully completed."
    statuses = done["status"]["replicaStatuses"]
    assert (statuses["Master"]["active"], statuses["Master"]["succeeded"], statuses["Master"]["failed"]) == (0, 1, 0)
    assert (statuses["Worker"]["active"], statuses["Worker"]["failed"]) == (0, 0)
    assert done["status"]["completionTime"] >= done["status"]["startTime"]
    wait_until(lambda: not pid_alive(worker_pid), "the worker to be stopped once the master succeeded")
    worker_log = standin.workdir / standin.namespace / "train" / "worker-0.log"
    wait_until(lambda: "stopped worker-0: the job has ended" in worker_log.read_text(), "the worker's stop in its log")

    wait_until(lambda: history.first("Succeeded") is not None, "the Succeeded event")
    running_at = history.first("Running")
    assert running_at is not None and running_at < (history.first("Succeeded") or 0)
    log = (standin.workdir / standin.namespace / "train" / "master-0.log").read_text()
    assert "probe rank 0 recorded" in log


@pytest.mark.timeout(60)
def test_nproc_per_node_starts_local_ranks(standin: Harness) -> None:
    out = standin.out
    tmpl = template(
        ["--out", str(out), "--wait-for", str(out / "release")],
        container={"ports": [{"name": "metrics", "containerPort": 9400}, {"name": "other", "containerPort": 7000}]},
    )
    standin.create_job("ranks", {"Master": replica_spec(tmpl), "Worker": replica_spec(tmpl)}, nproc_per_node="2")
    records = {rank: standin.record(rank) for rank in range(4)}
    (out / "release").write_text("go")
    standin.wait_condition("ranks", "Succeeded")

    envs = [records[rank]["env"] for rank in range(4)]
    assert [(env["PET_NODE_RANK"], env["LOCAL_RANK"]) for env in envs] == [
        ("0", "0"),
        ("0", "1"),
        ("1", "0"),
        ("1", "1"),
    ]
    assert {env["WORLD_SIZE"] for env in envs} == {"4"}
    assert {env["LOCAL_WORLD_SIZE"] for env in envs} == {env["PET_NPROC_PER_NODE"] for env in envs} == {"2"}
    assert len({env["MASTER_PORT"] for env in envs}) == 1
    assert len({records[rank]["pid"] for rank in range(4)}) == 4
    # The `metrics` container port becomes one free local port per replica (ranks of a replica add LOCAL_RANK).
    master_port, worker_port = (int(envs[rank]["FORGE_METRICS_PORT"]) for rank in (0, 2))
    assert envs[1]["FORGE_METRICS_PORT"] == str(master_port) and envs[3]["FORGE_METRICS_PORT"] == str(worker_port)
    assert master_port != worker_port and 9400 not in (master_port, worker_port)
    state = json.loads((standin.workdir / standin.namespace / "ranks" / "state.json").read_text())
    assert {name: replica["metricsPort"] for name, replica in state["replicas"].items()} == {
        "master-0": master_port,
        "worker-0": worker_port,
    }


@pytest.mark.timeout(60)
def test_volumes_are_materialised_and_env_references_resolved(standin: Harness) -> None:
    core, ns, out = standin.core, standin.namespace, standin.out
    core.create_namespaced_config_map(
        ns,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="forge-config"),
            data={"config.json": '{"lr": "2e-5"}', "extra.txt": "extra", "level": "debug"},
        ),
    )
    core.create_namespaced_secret(
        ns, client.V1Secret(metadata=client.V1ObjectMeta(name="creds"), string_data={"token": "s3cret"})
    )
    volumes = [
        {
            "name": "config",
            "configMap": {"name": "forge-config", "items": [{"key": "config.json", "path": "conf/config.json"}]},
        },
        {"name": "all", "configMap": {"name": "forge-config"}},
        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        {"name": "scratch", "emptyDir": {}},
    ]
    env = [
        {"name": "CONFIG_FILE", "value": "/etc/forge/conf/config.json"},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "forge-config", "key": "level"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
        {
            "name": "ROLE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['training.kubeflow.org/replica-type']"}},
        },
    ]
    mounts = [
        {"name": "config", "mountPath": "/etc/forge", "readOnly": True},
        {"name": "all", "mountPath": "/etc/extra.txt", "subPath": "extra.txt"},
        {"name": "creds", "mountPath": "/var/run/creds"},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    args = ["--out", str(out), "--read", "$(CONFIG_FILE)", "--read", "/etc/extra.txt", "--read", "/var/run/creds/token"]
    tmpl = template(
        [*args, "--touch", "/scratch/made-here"],
        labels={"team": "ml"},
        volumes=volumes,
        container={"env": env, "volumeMounts": mounts, "workingDir": "/scratch"},
    )
    standin.create_job("vol", {"Master": replica_spec(tmpl)})
    record = standin.record(0)
    standin.wait_condition("vol", "Succeeded")

    replica_dir = standin.workdir / ns / "vol" / "master-0"
    volumes_dir = replica_dir / "volumes"
    assert record["files"] == {
        str(volumes_dir / "config/conf/config.json"): '{"lr": "2e-5"}',
        str(volumes_dir / "all/extra.txt"): "extra",
        str(volumes_dir / "creds/token"): "s3cret",
    }
    assert record["modes"][str(volumes_dir / "creds/token")] == "0o400"
    assert not any("/etc/forge" in arg or "/var/run/creds" in arg for arg in record["argv"])
    seen = record["env"]
    assert seen["CONFIG_FILE"] == str(volumes_dir / "config/conf/config.json")
    assert (seen["LEVEL"], seen["TOKEN"], seen["TEAM"], seen["ROLE"]) == ("debug", "s3cret", "ml", "master")
    assert (seen["POD_NAME"], seen["POD_NAMESPACE"]) == ("vol-master-0", ns)
    assert record["cwd"] == str(volumes_dir / "scratch")
    assert (volumes_dir / "scratch/made-here").read_text() == "written by the replica"


@pytest.mark.timeout(60)
def test_on_failure_restarts_then_succeeds(standin: Harness) -> None:
    history = standin.history("flaky")
    tmpl = template(["--out", str(standin.out), "--fail-first", str(standin.out / "failed-once")])
    standin.create_job("flaky", {"Master": replica_spec(tmpl, restart_policy="OnFailure")}, {"backoffLimit": 2})
    done = standin.wait_condition("flaky", "Succeeded")

    assert len(standin.starts(0)) == 2
    assert conditions(done) == {"Created": "True", "Running": "False", "Succeeded": "True"}
    assert done["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    wait_until(lambda: history.first("Succeeded") is not None, "the Succeeded event")
    running, restarting, succeeded = (history.first(t) for t in ("Running", "Restarting", "Succeeded"))
    assert running is not None and restarting is not None and succeeded is not None, history.seen
    assert running < restarting < succeeded, history.seen
    log = (standin.workdir / standin.namespace / "flaky" / "master-0.log").read_text()
    assert "probe failing on purpose" in log and "attempt 2" in log


@pytest.mark.timeout(60)
def test_backoff_limit_exhausted_fails_the_job(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out), "--exit", "1"])
    standin.create_job("doomed", {"Master": replica_spec(tmpl, restart_policy="OnFailure")}, {"backoffLimit": 1})
    failed = standin.wait_condition("doomed", "Failed")

    reason = condition(failed, "Failed")
    assert reason["reason"] == "PyTorchJobFailed"
    assert "backoff limit" in reason["message"]
    assert len(standin.starts(0)) == 2  # the first run and one restart
    master = failed["status"]["replicaStatuses"]["Master"]
    assert (master["active"], master["failed"]) == (0, 1)
    assert failed["status"]["completionTime"]


@pytest.mark.timeout(60)
def test_permanent_worker_failure_fails_the_job_and_stops_the_master(standin: Harness) -> None:
    out = standin.out
    master = template(["--out", str(out), "--sleep"])
    worker = template(["--out", str(out), "--wait-for", str(out / "record-0.json"), "--exit", "3"])
    standin.create_job(
        "strict",
        {
            "Master": replica_spec(master, restart_policy="Never"),
            "Worker": replica_spec(worker, restart_policy="ExitCode"),
        },
    )
    failed = standin.wait_condition("strict", "Failed")

    assert condition(failed, "Failed")["message"] == "PyTorchJob strict is failed because 1 Worker replica(s) failed."
    assert failed["status"]["replicaStatuses"]["Worker"]["failed"] == 1
    assert len(standin.starts(1)) == 1  # exit code 3 is permanent under ExitCode: no restart
    master_pid = standin.record(0)["pid"]
    wait_until(lambda: not pid_alive(master_pid), "the master to be stopped")
    assert _state(standin, "strict")["replicas"]["master-0"]["state"] == "Stopped"


@pytest.mark.timeout(60)
def test_suspend_stops_processes_and_resume_restarts_them(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out), "--sleep"])
    standin.create_job("pausable", {"Master": replica_spec(tmpl)})
    standin.wait_job("pausable", lambda job: _active(job, "Master") == 1, "the master to run")
    first_pid = standin.record(0)["pid"]

    standin.patch_job("pausable", {"spec": {"runPolicy": {"suspend": True}}})
    suspended = standin.wait_condition("pausable", "Suspended")
    assert condition(suspended, "Running")["status"] == "False"
    assert (
        condition(suspended, "Running")["reason"]
        == condition(suspended, "Suspended")["reason"]
        == "PyTorchJobSuspended"
    )
    assert _active(suspended, "Master") == 0
    wait_until(lambda: not pid_alive(first_pid), "the suspended master to stop")

    standin.patch_job("pausable", {"spec": {"runPolicy": {"suspend": False}}})
    resumed = standin.wait_job(
        "pausable",
        lambda job: conditions(job).get("Suspended") == "False" and conditions(job).get("Running") == "True",
        "Suspended=False and Running=True",
    )
    assert condition(resumed, "Suspended")["reason"] == "PyTorchJobResumed"
    starts = wait_until(lambda: standin.starts(0) if len(standin.starts(0)) == 2 else None, "a second start")
    assert starts[0] == first_pid and pid_alive(starts[1])


def _pods(standin: Harness, job: str) -> dict[str, str]:
    """{pod name: uid} of the job's Pod objects."""
    listed = standin.core.list_namespaced_pod(standin.namespace, label_selector=f"training.kubeflow.org/job-name={job}")
    return {pod.metadata.name: pod.metadata.uid for pod in listed.items if pod.metadata.deletion_timestamp is None}


@pytest.mark.timeout(90)
def test_each_replica_has_a_pod_and_deleting_it_restarts_the_replica(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out), "--sleep"])
    standin.create_job("podded", {"Master": replica_spec(tmpl), "Worker": replica_spec(tmpl)}, {"backoffLimit": 0})
    pods = wait_until(lambda: _pods(standin, "podded") if len(_pods(standin, "podded")) == 2 else None, "two pods")
    assert set(pods) == {"podded-master-0", "podded-worker-0"}
    pod = standin.core.read_namespaced_pod("podded-worker-0", standin.namespace)
    assert pod.metadata.labels["training.kubeflow.org/replica-type"] == "worker"
    assert pod.metadata.owner_references[0].kind == "PyTorchJob" and pod.metadata.owner_references[0].controller
    master_pid, worker_pid = standin.record(0)["pid"], standin.record(1)["pid"]

    standin.core.delete_namespaced_pod("podded-worker-0", standin.namespace)
    restarted = wait_until(lambda: standin.starts(1) if len(standin.starts(1)) == 2 else None, "the worker's restart")
    assert not pid_alive(worker_pid) and pid_alive(restarted[1])
    new_pods = wait_until(
        lambda: (
            _pods(standin, "podded")
            if _pods(standin, "podded").get("podded-worker-0") not in (None, pods["podded-worker-0"])
            else None
        ),
        "a new worker pod",
    )
    assert new_pods["podded-master-0"] == pods["podded-master-0"]
    assert standin.starts(0) == [master_pid] and pid_alive(master_pid)  # the other replica was left alone
    # A deleted pod is no failure: with backoffLimit 0 the job still runs.
    job = standin.job("podded")
    assert conditions(job).get("Failed") != "True" and _active(job, "Worker") == 1
    log = (standin.workdir / standin.namespace / "podded" / "worker-0.log").read_text()
    assert "pod podded-worker-0 was deleted: restarting worker-0" in log


@pytest.mark.timeout(60)
def test_deleting_the_job_stops_its_process_groups(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out), "--spawn-child", "--sleep"])
    standin.create_job("gone", {"Master": replica_spec(tmpl), "Worker": replica_spec(tmpl)})
    records = [standin.record(rank) for rank in (0, 1)]
    pids = [pid for record in records for pid in (record["pid"], record["child_pid"])]
    assert all(pid_alive(pid) for pid in pids)

    standin.objects.delete_namespaced_custom_object(GROUP, VERSION, standin.namespace, PLURAL, "gone")
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), "every process and child to stop")
    states = wait_until(
        lambda: {r["state"] for r in _state(standin, "gone")["replicas"].values()} == {"Stopped"} or None,
        "state.json to say Stopped",
    )
    assert states


@pytest.mark.timeout(60)
def test_active_deadline_fails_the_job_and_stops_it(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out), "--sleep"])
    standin.create_job("late", {"Master": replica_spec(tmpl)}, {"activeDeadlineSeconds": 2})
    pid = standin.record(0)["pid"]
    failed = standin.wait_condition("late", "Failed", timeout_s=20)
    assert "active longer than specified deadline" in condition(failed, "Failed")["message"]
    assert condition(failed, "Running")["status"] == "False"
    wait_until(lambda: not pid_alive(pid), "the master to be stopped")


def _grant_config_map_reader(core: client.CoreV1Api, rbac: client.RbacAuthorizationV1Api, ns: str) -> None:
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="trainer")))
    rbac.create_namespaced_role(
        ns,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="trainer"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        ns,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="trainer"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="trainer"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="trainer", namespace=ns)],
        ),
    )


@pytest.mark.timeout(60)
def test_processes_get_the_service_accounts_credentials(standin: Harness) -> None:
    ns = standin.namespace
    _grant_config_map_reader(standin.core, client.RbacAuthorizationV1Api(standin.api), ns)
    tmpl = template(["--out", str(standin.out), "--kube", ns], serviceAccountName="trainer")
    standin.create_job("creds", {"Master": replica_spec(tmpl)})
    record = standin.record(0)
    standin.wait_condition("creds", "Succeeded")

    assert record["api"] == {"configmaps": 200, "secrets": 403, "subject": f"system:serviceaccount:{ns}:trainer"}
    assert not any(name.startswith(("KUBERNETES_SERVICE", "KUBERNETES_PORT")) for name in record["env"])
    kubeconfig = Path(record["env"]["KUBECONFIG"])
    assert kubeconfig.stat().st_mode & 0o777 == 0o600


@pytest.mark.timeout(60)
def test_a_replica_waits_for_its_service_account(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out)], serviceAccountName="late")
    standin.create_job("waiting", {"Master": replica_spec(tmpl)})
    waiting_for = wait_until(
        lambda: _state(standin, "waiting").get("replicas", {}).get("master-0", {}).get("waitingFor"),
        "the stand-in to report what master-0 waits for",
    )
    assert waiting_for == 'serviceaccount "late" not found'
    assert "Running" not in conditions(standin.job("waiting"))

    standin.core.create_namespaced_service_account(
        standin.namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="late"))
    )
    standin.wait_condition("waiting", "Succeeded")


@pytest.mark.timeout(60)
def test_a_job_without_a_pytorch_container_fails_validation(standin: Harness) -> None:
    tmpl = template(["--out", str(standin.out)], container={"name": "main"})
    standin.create_job("invalid", {"Master": replica_spec(tmpl)})
    failed = standin.wait_condition("invalid", "Failed")
    assert condition(failed, "Failed")["reason"] == "PyTorchJobFailedValidation"
    assert "no container named 'pytorch'" in condition(failed, "Failed")["message"]
    assert standin.starts(0) == []


@pytest.mark.timeout(30)
def test_kubeflow_crd_rejects_an_invalid_pytorchjob(cluster: LocalCluster, namespace: str) -> None:
    if not uses_real_kubeflow_crd():
        pytest.skip("Kubeflow's PyTorchJob CRD is not available (../shared/fixtures)")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": "bad"},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": "two", "template": template(["--out", "/tmp"])}}},
    }
    with cluster.api_client() as api, pytest.raises(ApiException) as raised:
        client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    assert raised.value.status == 422


@pytest.mark.timeout(90)
def test_cli_runs_until_sigterm_leaves_no_process_and_shows_logs(
    cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    workdir, out = tmp_path / "standin", tmp_path / "out"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    command = [sys.executable, "-m", "forge_dev.training_operator_standin", "run", "--workdir", str(workdir)]
    with (tmp_path / "standin.out").open("wb") as output:
        standin = subprocess.Popen(
            [*command, "--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with cluster.api_client() as api:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "PyTorchJob",
                "metadata": {"name": "cli"},
                "spec": {
                    "pytorchReplicaSpecs": {
                        "Master": replica_spec(template(["--out", str(out), "--spawn-child", "--sleep"]))
                    }
                },
            }
            client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        record_path = out / "record-0.json"
        wait_until(record_path.exists, "the replica to start")
        record = json.loads(record_path.read_text())
        pids = [record["pid"], record["child_pid"]]
        assert all(pid_alive(pid) for pid in pids)

        standin.send_signal(signal.SIGTERM)
        assert standin.wait(timeout=30) == 0
        assert not any(pid_alive(pid) for pid in pids), "the stand-in left processes behind"
    finally:
        if standin.poll() is None:
            standin.kill()
            standin.wait()

    forge_dev = [sys.executable, "-m", "forge_dev.cli", "logs", "cli", "--workdir", str(workdir)]
    shown = subprocess.run([*forge_dev, "-f"], capture_output=True, text=True, timeout=30, check=True)
    assert "probe rank 0 recorded" in shown.stdout
    assert "stopped master-0: the stand-in is shutting down" in shown.stdout
    missing = subprocess.run([*forge_dev, "--replica", "worker-3"], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "replicas with logs: master-0" in missing.stderr
