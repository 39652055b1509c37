"""Pure builders: the trainer config, the PyTorchJob, RBAC, owner references, the accepted spec."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forge_operator.api import ForgeJobSpec
from forge_operator.defaults import resolve
from forge_operator.render import (
    ACCEPTED_SPEC_ANNOTATION,
    ACCEPTED_SPEC_KEY,
    Owner,
    RenderOptions,
    build_children,
    build_config_map,
    build_pytorchjob,
    build_role,
    build_trainer_config,
    changed_paths,
    frozen_spec,
    grace_steps,
    spec_digest,
)

OWNER = Owner(name="bot", namespace="team", uid="1234-abcd")
OPTIONS = RenderOptions(trainer_image="registry/forge-trainer:1", trainer_metrics_port=9400)


def spec(**overrides: Any) -> ForgeJobSpec:
    raw: dict[str, Any] = {
        "model": {"base": "s3://models/llama-3.2-1b/"},
        "technique": "sft",
        "data": {"domain": [{"uri": "s3://acme/d/", "weight": 3}], "general": [{"uri": "s3://acme/g/"}]},
        "checkpoints": {"output": "s3://acme/o/"},
        "resources": {"nodes": 2, "gpusPerNode": 4},
    }
    raw.update(overrides)
    return ForgeJobSpec.model_validate(raw)


def test_children_are_deterministic_and_owned() -> None:
    first = build_children(OWNER, spec(), resolve(spec()), OPTIONS)
    second = build_children(OWNER, spec(), resolve(spec()), OPTIONS)
    assert first == second
    assert [c["kind"] for c in first] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PyTorchJob"]
    assert [c["metadata"]["name"] for c in first] == ["bot-config", "bot-trainer", "bot-trainer", "bot-trainer", "bot"]
    for child in first:
        (reference,) = child["metadata"]["ownerReferences"]
        assert reference["uid"] == "1234-abcd" and reference["controller"] is True
        assert reference["kind"] == "ForgeJob" and reference["apiVersion"] == "forge.dev/v1alpha1"
        assert child["metadata"]["namespace"] == "team"


def test_pytorchjob_shape() -> None:
    job = build_pytorchjob(OWNER, spec(), OPTIONS)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "4"
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["ports"][0] == {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 4}, "requests": {"nvidia.com/gpu": 4}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert job["spec"]["runPolicy"] == {"backoffLimit": 3, "suspend": False}
    assert replicas["Master"]["restartPolicy"] == "ExitCode"


def test_single_node_has_no_worker_and_cpu_has_no_gpu() -> None:
    job = build_pytorchjob(OWNER, spec(resources={"nodes": 1, "gpusPerNode": 0}), OPTIONS)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert job["spec"]["nprocPerNode"] == "1"
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {}
    assert all(v["name"] != "dshm" for v in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"])


def test_suspend_and_run_policy_are_rendered() -> None:
    job = build_pytorchjob(
        OWNER,
        spec(suspend=True, runPolicy={"backoffLimit": 0, "restartPolicy": "ExitCode", "ttlSecondsAfterFinished": 60}),
        OPTIONS,
    )
    assert job["spec"]["runPolicy"] == {"backoffLimit": 0, "suspend": True, "ttlSecondsAfterFinished": 60}
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"


def test_image_comes_from_the_spec_or_the_operator() -> None:
    own = build_pytorchjob(OWNER, spec(resources={"image": "mine:2"}), OPTIONS)
    assert own["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] == "mine:2"
    with pytest.raises(ValueError, match="no trainer image"):
        build_pytorchjob(OWNER, spec(), RenderOptions(trainer_image=None))


def test_role_allows_only_this_forgejob() -> None:
    rules = build_role(OWNER)["rules"]
    assert all(rule["resourceNames"] == ["bot"] for rule in rules)
    verbs = {resource: rule["verbs"] for rule in rules for resource in rule["resources"]}
    assert verbs == {"forgejobs": ["get"], "forgejobs/status": ["get", "patch"]}


def test_trainer_config_core_values() -> None:
    job_spec = spec(
        technique="lora",
        lora={"rank": 8, "alpha": 16, "dropoutPercent": 10},
        eval={"general": [{"uri": "s3://held/g/"}]},
        training={"learningRate": "1.5e-4", "schedule": "wsd", "gradientClipping": "0.5", "weightDecay": "0.1"},
    )
    resolved = resolve(job_spec)
    config = build_trainer_config(OWNER, job_spec, resolved, OPTIONS)
    assert config["model"]["lora"] == {
        "rank": 8,
        "alpha": 16,
        "dropout": 0.1,
        "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    assert config["training"]["learningRate"] == 1.5e-4
    assert config["training"]["gradientAccumulationSteps"] == resolved.gradient_accumulation_steps
    assert config["training"]["schedule"] == "wsd" and config["training"]["weightDecay"] == 0.1
    # No eval.domain: the trainer holds out eval.holdOutPerMille of the training domain documents itself.
    assert config["eval"]["domain"] == [] and config["eval"]["holdOutPerMille"] == 20
    assert config["eval"]["general"] == [{"uri": "s3://held/g/", "weight": 1}]
    assert config["report"]["forgeJob"]["name"] == "bot" and config["report"]["metricsPort"] == 9400
    assert "lora" not in build_trainer_config(OWNER, spec(), resolve(spec()), OPTIONS)["model"]


def test_config_map_holds_the_config_and_the_accepted_spec() -> None:
    job_spec = spec()
    config_map = build_config_map(OWNER, job_spec, resolve(job_spec), OPTIONS)
    config = json.loads(config_map["data"]["config.json"])
    assert config["jobName"] == "bot"
    stored = ForgeJobSpec.model_validate_json(config_map["data"][ACCEPTED_SPEC_KEY])
    assert frozen_spec(stored) == frozen_spec(job_spec)
    assert ACCEPTED_SPEC_ANNOTATION not in config_map["metadata"]["annotations"]


def test_literal_env_values_are_in_no_annotation_of_any_child() -> None:
    secretish = "AKIA-not-a-real-key-7f3e"
    job_spec = spec(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": secretish}])
    children = build_children(OWNER, job_spec, resolve(job_spec), OPTIONS)
    for child in children:
        assert secretish not in json.dumps(child["metadata"]), child["kind"]
    config_map, pytorchjob = children[0], children[-1]
    assert secretish in config_map["data"][ACCEPTED_SPEC_KEY], "the accepted spec keeps it (re-creation needs it)"
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert {"name": "AWS_SECRET_ACCESS_KEY", "value": secretish} in container["env"]


def test_digest_ignores_suspend_and_selection_only() -> None:
    assert spec_digest(spec()) == spec_digest(spec(suspend=True))
    assert spec_digest(spec()) == spec_digest(spec(checkpoints={"output": "s3://acme/o/", "selection": "last"}))
    confident = spec(checkpoints={"output": "s3://acme/o/", "budgetConfidencePercent": 95})
    assert spec_digest(spec()) == spec_digest(confident)
    assert spec_digest(spec()) != spec_digest(spec(training={"maxSteps": 5}))
    assert spec_digest(spec()) != spec_digest(spec(checkpoints={"output": "s3://acme/o/", "keep": 9}))


def test_changed_paths_name_each_field() -> None:
    old = frozen_spec(spec())
    new = frozen_spec(spec(training={"learningRate": "1e-5"}, resources={"nodes": 4, "gpusPerNode": 4}))
    assert changed_paths(old, new) == ["spec.resources.nodes", "spec.training.learningRate"]
    assert changed_paths(old, old) == []


def _container(job: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    container: dict[str, Any] = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]
    return container


def test_every_local_rank_declares_its_metrics_port() -> None:
    ports = _container(build_pytorchjob(OWNER, spec(), OPTIONS), "Worker")["ports"]
    assert ports[1:] == [
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
        {"name": "metrics-1", "containerPort": 9401, "protocol": "TCP"},
        {"name": "metrics-2", "containerPort": 9402, "protocol": "TCP"},
        {"name": "metrics-3", "containerPort": 9403, "protocol": "TCP"},
    ]
    cpu = _container(build_pytorchjob(OWNER, spec(resources={"nodes": 1, "gpusPerNode": 0}), OPTIONS))["ports"]
    assert [p["name"] for p in cpu] == ["pytorchjob-port", "metrics"]
    big = _container(build_pytorchjob(OWNER, spec(resources={"nodes": 1, "gpusPerNode": 16}), OPTIONS))["ports"]
    assert big[-1] == {"name": "metrics-15", "containerPort": 9415, "protocol": "TCP"}
    assert all(len(p["name"]) <= 15 for p in big), "a container port name is at most 15 characters"


DEFAULT_RESOURCES = {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi"}}


def test_operator_default_resources_apply_when_the_forgejob_sets_none() -> None:
    options = RenderOptions(trainer_image="t:1", trainer_resources=DEFAULT_RESOURCES)
    resources = _container(build_pytorchjob(OWNER, spec(), options))["resources"]
    assert resources == {
        "limits": {"memory": "128Gi", "nvidia.com/gpu": 4},
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 4},
    }
    own = spec(resources={"nodes": 1, "gpusPerNode": 0, "resources": {"requests": {"cpu": "2"}}})
    assert _container(build_pytorchjob(OWNER, own, options))["resources"] == {"requests": {"cpu": "2"}}
    assert DEFAULT_RESOURCES["requests"] == {"cpu": "8", "memory": "64Gi"}, "the defaults are not mutated"


def test_pull_policy_comes_from_the_spec_or_the_operator() -> None:
    options = RenderOptions(trainer_image="t:1", trainer_image_pull_policy="Always")
    assert _container(build_pytorchjob(OWNER, spec(), options))["imagePullPolicy"] == "Always"
    own = spec(resources={"nodes": 2, "gpusPerNode": 4, "imagePullPolicy": "Never"})
    assert _container(build_pytorchjob(OWNER, own, options))["imagePullPolicy"] == "Never"
    assert "imagePullPolicy" not in _container(build_pytorchjob(OWNER, spec(), OPTIONS))


CHECKPOINTS_95 = {"output": "s3://acme/o/", "budgetConfidencePercent": 95}


def test_forgetting_budget_and_action_reach_the_trainer_config() -> None:
    job_spec = spec(forgetting={"budgetPercent": 5, "action": "rebalance"}, checkpoints=CHECKPOINTS_95)
    config = build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)
    assert config["forgetting"] == {
        "budgetPercent": 5.0,
        "action": "rebalance",
        "confidencePercent": 95,  # checkpoints.budgetConfidencePercent: the guard judges the budget at this level too
        "graceSteps": 100,
        "graceEvals": 2,
        "slopeWindowEvals": 3,
        "lrTooHighFactor": 3.0,
        "noProgressEvals": 5,
        "divergenceFactor": 3.0,
        "gradSpikeFactor": 10.0,
        "gradSpikeSteps": 5,
    }


def test_guard_settings_are_rendered_with_the_trainers_types() -> None:
    job_spec = spec(
        training={"maxSteps": 3000},
        forgetting={
            "gracePercent": 20,
            "graceEvals": 0,
            "slopeWindowEvals": 4,
            "lrTooHighFactor": 2,
            "noProgressEvals": 9,
            "divergenceFactor": 4,
            "gradSpikeFactor": 50,
            "gradSpikeSteps": 3,
        },
    )
    forgetting = build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)["forgetting"]
    assert forgetting["graceSteps"] == 600 and type(forgetting["graceSteps"]) is int
    assert (forgetting["graceEvals"], forgetting["slopeWindowEvals"], forgetting["noProgressEvals"]) == (0, 4, 9)
    assert forgetting["gradSpikeSteps"] == 3
    factors = [forgetting[key] for key in ("lrTooHighFactor", "divergenceFactor", "gradSpikeFactor")]
    assert factors == [2.0, 4.0, 50.0] and all(type(value) is float for value in factors)


@pytest.mark.parametrize(
    ("max_steps", "percent", "steps"), [(1000, 10, 100), (15, 10, 2), (1, 10, 1), (3000, 0, 0), (7, 100, 7)]
)
def test_grace_steps_round_up_like_the_trainers_default(max_steps: int, percent: int, steps: int) -> None:
    job_spec = spec(training={"maxSteps": max_steps}, eval={"everySteps": 1}, forgetting={"gracePercent": percent})
    assert grace_steps(job_spec) == steps
    assert build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)["forgetting"]["graceSteps"] == steps


def test_kl_top_k_and_candidates_reach_the_trainer_config() -> None:
    default = build_trainer_config(OWNER, spec(), resolve(spec()), OPTIONS)
    assert default["eval"]["klTopK"] == 16
    assert default["checkpoints"]["candidates"] == {"averageLast": 3, "interpolationAlphas": [0.25, 0.5, 0.75]}
    job_spec = spec(
        eval={"klTopK": 64},
        checkpoints={"output": "s3://acme/o/", "candidates": {"averageLast": 0, "interpolationAlphaPercents": [1, 99]}},
    )
    config = build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)
    assert config["eval"]["klTopK"] == 64
    assert config["checkpoints"]["candidates"] == {"averageLast": 0, "interpolationAlphas": [0.01, 0.99]}
    off = spec(checkpoints={"output": "s3://acme/o/", "candidates": {"interpolationAlphaPercents": []}})
    assert (
        build_trainer_config(OWNER, off, resolve(off), OPTIONS)["checkpoints"]["candidates"]["interpolationAlphas"]
        == []
    )


def test_guard_and_candidate_settings_are_frozen_once_started() -> None:
    assert spec_digest(spec()) != spec_digest(spec(forgetting={"gracePercent": 20}))
    assert spec_digest(spec()) != spec_digest(
        spec(checkpoints={"output": "s3://acme/o/", "candidates": {"averageLast": 0}})
    )
    assert changed_paths(frozen_spec(spec()), frozen_spec(spec(eval={"klTopK": 0}))) == ["spec.eval.klTopK"]


def test_learning_rate_probe_is_rendered_as_factors_only_when_set() -> None:
    assert "probe" not in build_trainer_config(OWNER, spec(), resolve(spec()), OPTIONS)["training"]
    default = spec(training={"learningRateProbe": {}})
    assert build_trainer_config(OWNER, default, resolve(default), OPTIONS)["training"]["probe"] == {
        "multipliers": [0.25, 0.5, 1.0, 2.0, 4.0],
        "steps": 20,
        "evaluations": 4,
        "evalMaxTokens": 32768,
    }
    job_spec = spec(
        eval={"maxTokens": 16384},
        training={
            "learningRate": "2e-5",
            "learningRateProbe": {
                "multiplierPercents": [10, 150],
                "steps": 50,
                "evaluations": 5,
                "evalMaxTokens": 65536,
            },
        },
    )
    training = build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)["training"]
    assert training["learningRate"] == 2e-5, "the configured rate: the trainer applies the probe's multiple"
    assert training["probe"] == {"multipliers": [0.1, 1.5], "steps": 50, "evaluations": 5, "evalMaxTokens": 16384}
    assert all(type(value) is float for value in training["probe"]["multipliers"])
    assert changed_paths(frozen_spec(spec()), frozen_spec(default)) == ["spec.training.learningRateProbe"]


def test_queue_and_priority_reach_kueue_and_the_pods() -> None:
    queued = build_pytorchjob(
        OWNER,
        spec(scheduling={"queueName": "team-a", "workloadPriorityClass": "high", "priorityClassName": "batch"}),
        OPTIONS,
    )
    labels = queued["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a" and labels["kueue.x-k8s.io/priority-class"] == "high"
    assert queued["spec"]["runPolicy"]["suspend"] is True, "created suspended, as Kueue's webhook would make it"
    assert queued["metadata"]["annotations"]["forge.dev/suspend-requested"] == "false"
    for replica in queued["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["priorityClassName"] == "batch"
        assert "kueue.x-k8s.io/queue-name" not in replica["template"]["metadata"]["labels"]
    plain = build_pytorchjob(OWNER, spec(), OPTIONS)
    assert not any(key.startswith("kueue.x-k8s.io/") for key in plain["metadata"]["labels"])
    assert plain["spec"]["runPolicy"]["suspend"] is False
    assert "priorityClassName" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_pytorchjob_keeps_its_final_status_until_the_operator_read_it() -> None:
    job = build_pytorchjob(OWNER, spec(suspend=True), OPTIONS)
    assert job["metadata"]["finalizers"] == ["forge.dev/final-status"]
    assert job["metadata"]["annotations"]["forge.dev/suspend-requested"] == "true"


def test_queue_is_frozen_once_started() -> None:
    before = spec(scheduling={"queueName": "team-a"})
    after = spec(scheduling={"queueName": "team-b"})
    assert changed_paths(frozen_spec(before), frozen_spec(after)) == ["spec.scheduling.queueName"]


def test_trainer_pods_meet_pod_security_restricted_by_default() -> None:
    from tests.operator.pod_security import restricted_violations

    for gpus in (0, 4):
        job = build_pytorchjob(OWNER, spec(resources={"nodes": 2, "gpusPerNode": gpus}), OPTIONS)
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            pod = replica["template"]["spec"]
            assert restricted_violations(pod) == []
            (container,) = pod["containers"]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert {"/tmp", "/tmp/forge"} <= writable, "temporary files and the scratch folder stay writable"
    opted_out = build_pytorchjob(OWNER, spec(), RenderOptions(trainer_image="t:1", restricted=False))
    pod = opted_out["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "securityContext" not in pod
    assert any("runAsNonRoot" in problem for problem in restricted_violations(pod)), "the checker can fail"


def test_the_restricted_checker_flags_each_rule() -> None:
    from tests.operator.pod_security import restricted_violations

    bad = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
            }
        ],
    }
    problems = " | ".join(restricted_violations(bad))
    for expected in (
        "hostNetwork",
        "runAsUser is 0",
        "hostPath",
        "hostPort",
        "privileged",
        "SYS_ADMIN",
        "allowPrivilegeEscalation",
        "drop ALL",
        "runAsNonRoot",
        "seccompProfile",
    ):
        assert expected in problems, expected


def test_gpu_type_pull_secrets_and_volume_limits_reach_the_pods() -> None:
    custom = spec(
        resources={
            "nodes": 2,
            "gpusPerNode": 2,
            "gpuResource": "amd.com/gpu",
            "imagePullSecrets": ["regcred"],
            "scratchSizeLimit": "100Gi",
            "shmSizeLimit": "8Gi",
        }
    )
    job = build_pytorchjob(OWNER, custom, OPTIONS)
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        container["resources"]["limits"]["amd.com/gpu"] == 2
        and "nvidia.com/gpu" not in container["resources"]["limits"]
    )
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "100Gi"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    account = next(c for c in build_children(OWNER, custom, resolve(custom), OPTIONS) if c["kind"] == "ServiceAccount")
    assert account["imagePullSecrets"] == [{"name": "regcred"}]
    plain = build_pytorchjob(OWNER, spec(), OPTIONS)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "imagePullSecrets" not in plain and {v["name"]: v for v in plain["volumes"]}["scratch"]["emptyDir"] == {}


def test_pod_template_fields_reach_every_replica_and_stay_restricted() -> None:
    from tests.operator.helpers import POD_TEMPLATE_ENV_FROM, POD_TEMPLATE_RESOURCES
    from tests.operator.pod_security import restricted_violations

    custom = spec(resources={"nodes": 2, "gpusPerNode": 4, **POD_TEMPLATE_RESOURCES}, envFrom=POD_TEMPLATE_ENV_FROM)
    job = build_pytorchjob(OWNER, custom, OPTIONS)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        template = replica["template"]
        pod = template["spec"]
        (container,) = pod["containers"]
        assert pod["affinity"] == POD_TEMPLATE_RESOURCES["affinity"]
        names = [v["name"] for v in pod["volumes"]]
        assert names[:4] == ["forge-config", "scratch", "tmp", "dshm"], "Forge's volumes come first"
        assert pod["volumes"][4:] == POD_TEMPLATE_RESOURCES["volumes"]
        assert container["volumeMounts"][-5:] == POD_TEMPLATE_RESOURCES["volumeMounts"]
        assert container["envFrom"] == POD_TEMPLATE_ENV_FROM
        assert template["metadata"]["labels"]["team"] == "nlp"
        assert template["metadata"]["labels"]["forge.dev/forgejob"] == "bot", "Forge's labels stay"
        assert template["metadata"]["annotations"] == POD_TEMPLATE_RESOURCES["podAnnotations"]
        assert restricted_violations(pod) == [], "PVC, ConfigMap, Secret and emptyDir volumes are all allowed"
    plain = build_pytorchjob(OWNER, spec(), OPTIONS)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert "affinity" not in plain["spec"] and "annotations" not in plain["metadata"]
    assert "envFrom" not in plain["spec"]["containers"][0]


def test_gang_scheduling_becomes_the_run_policy_scheduling_policy() -> None:
    from tests.operator.helpers import GANG_SCHEDULING

    job = build_pytorchjob(OWNER, spec(scheduling=GANG_SCHEDULING), OPTIONS)
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 2,  # every pod of the run (resources.nodes)
        "queue": "research",
        "priorityClass": "batch-low",  # from scheduling.priorityClassName
        "scheduleTimeoutSeconds": 600,
    }
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["schedulerName"] == "volcano"
    explicit = spec(
        resources={"nodes": 4, "gpusPerNode": 8},
        scheduling={"schedulerName": "scheduler-plugins-scheduler", "gang": {"minAvailable": 3, "priorityClass": "p"}},
    )
    policy = build_pytorchjob(OWNER, explicit, OPTIONS)["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy == {"minAvailable": 3, "priorityClass": "p"}
    plain = build_pytorchjob(OWNER, spec(), OPTIONS)
    assert "schedulingPolicy" not in plain["spec"]["runPolicy"]
    assert "schedulerName" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert changed_paths(frozen_spec(spec()), frozen_spec(spec(scheduling={"gang": {}}))) == ["spec.scheduling.gang"]


def test_compile_and_chunked_loss_default_on_with_gpus_and_off_on_cpu() -> None:
    def training(job_spec: ForgeJobSpec) -> dict[str, Any]:
        config: dict[str, Any] = build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)["training"]
        return config

    gpu = training(spec())
    assert (gpu["compile"], gpu["lossChunkTokens"]) == (True, 1024)
    cpu = training(spec(resources={"nodes": 1, "gpusPerNode": 0}))
    assert (cpu["compile"], cpu["lossChunkTokens"]) == (False, 0)
    zero3 = training(spec(training={"zeroStage": 3}))
    assert (zero3["compile"], zero3["lossChunkTokens"]) == (True, 0)
    own = training(spec(training={"compile": False, "lossChunkTokens": 256}, resources={"nodes": 1, "gpusPerNode": 0}))
    assert (own["compile"], own["lossChunkTokens"]) == (False, 256)


def test_zero_stage_defaults_by_world_size_and_the_spec_wins() -> None:
    def stage(job_spec: ForgeJobSpec) -> tuple[int, list[str]]:
        resolved = resolve(job_spec)
        config = build_trainer_config(OWNER, job_spec, resolved, OPTIONS)["training"]
        return int(config["zeroStage"]), [n for n in resolved.notes if n.startswith("zeroStage")]

    one_gpu, notes = stage(spec(resources={"nodes": 1, "gpusPerNode": 1}))
    assert one_gpu == 0 and notes == ["zeroStage 0: the default for worldSize 1 (0 for one process, 2 for more)"]
    assert stage(spec(resources={"nodes": 1, "gpusPerNode": 0}))[0] == 0  # one CPU process
    many, notes = stage(spec())  # 2 nodes x 4 GPUs
    assert many == 2 and notes == ["zeroStage 2: the default for worldSize 8 (0 for one process, 2 for more)"]
    assert stage(spec(training={"zeroStage": 1}, resources={"nodes": 1, "gpusPerNode": 1})) == (1, [])
    assert stage(spec(training={"zeroStage": 3})) == (3, [])


def test_pace_settings_reach_the_trainer_and_the_pods_know_their_pod_and_node() -> None:
    job_spec = spec(monitoring={"stragglerPercent": 150, "throughputDropPercent": 40, "slowReadBacks": 3})
    config = build_trainer_config(OWNER, job_spec, resolve(job_spec), OPTIONS)
    assert config["pace"] == {"stragglerPercent": 150, "dropPercent": 40, "readBacks": 3}
    defaults = build_trainer_config(OWNER, spec(), resolve(spec()), OPTIONS)
    assert defaults["pace"] == {"stragglerPercent": 130, "dropPercent": 50, "readBacks": 5}
    job = build_pytorchjob(OWNER, spec(env=[{"name": "A", "value": "1"}]), OPTIONS)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        env = {var["name"]: var for var in container["env"]}
        assert env["FORGE_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        assert env["FORGE_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["A"] == {"name": "A", "value": "1"}  # the ForgeJob's own come after (they may override)
