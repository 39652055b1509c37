"""Engine pieces that need no process group: schedules, the Kubeflow environment, the DeepSpeed config."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from forge_trainer.config import TrainerConfig, TrainingSettings
from forge_trainer.engine import deepspeed_config, dist_env, lr_factor
from forge_trainer.errors import DistributedError
from forge_trainer.launch import child_envs, from_trainer_v2, nproc_per_node
from tests.trainer.harness import merged


def training(**kw: Any) -> TrainingSettings:
    base: dict[str, Any] = {"learningRate": 1e-3, "microBatchSize": 1, "maxSteps": 100}
    return TrainingSettings.model_validate({**base, **kw})


def test_warmup_then_cosine_to_floor() -> None:
    t = training(warmupSteps=10, schedule="cosine", minLearningRate=1e-4)
    assert lr_factor(t, 0) == pytest.approx(0.1)
    assert lr_factor(t, 9) == pytest.approx(1.0)
    assert lr_factor(t, 10) == pytest.approx(1.0)
    assert lr_factor(t, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(t, 100) == pytest.approx(0.1)
    factors = [lr_factor(t, s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_constant() -> None:
    t = training(warmupSteps=4, schedule="constant")
    assert [lr_factor(t, s) for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]


def test_warmup_stable_decay() -> None:
    t = training(warmupSteps=5, schedule="wsd", decayPercent=20)
    assert lr_factor(t, 50) == 1.0 and lr_factor(t, 79) == 1.0
    assert lr_factor(t, 80) == pytest.approx(1 - 1 / 20)
    assert lr_factor(t, 99) == pytest.approx(0.0)
    assert math.isclose(lr_factor(t, 89), 0.5)


def test_dist_env_defaults_to_a_single_process() -> None:
    env = dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (0, 1, 0, "127.0.0.1", 29500)


def test_dist_env_from_kubeflow() -> None:
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3,
        4,
        0,
        "job-master-0",
        23456,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is negative"),
    ],
)
def test_dist_env_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedError, match=message):
        dist_env(env)


def test_launcher_envs_for_several_processes_per_pod() -> None:
    pod = {"WORLD_SIZE": "8", "RANK": "1", "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4"}
    assert nproc_per_node(pod) == 4
    envs = child_envs(pod, 4)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [
        ("4", "0", "8"),
        ("5", "1", "8"),
        ("6", "2", "8"),
        ("7", "3", "8"),
    ]
    assert nproc_per_node({**pod, "LOCAL_RANK": "0"}) == 1  # already a local process: no second launch
    with pytest.raises(DistributedError, match="do not fit"):
        child_envs({"WORLD_SIZE": "6", "RANK": "0"}, 4)
    with pytest.raises(DistributedError, match="PET_NPROC_PER_NODE='x'"):
        nproc_per_node({"PET_NPROC_PER_NODE": "x"})


def test_a_trainer_v2_node_gets_its_rank_and_rendezvous_from_the_runtimes_variables() -> None:
    node = {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "1"}
    node |= {"PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
    added = from_trainer_v2(node)
    assert added == {
        "MASTER_ADDR": "job-node-0-0.job",
        "MASTER_PORT": "29400",
        "RANK": "2",
        "WORLD_SIZE": "3",
        "LOCAL_RANK": "0",
    }
    denv = dist_env({**node, **added})
    assert (denv.rank, denv.world_size, denv.master_addr, denv.master_port) == (2, 3, "job-node-0-0.job", 29400)
    # Several local ranks: the launcher derives each child's RANK; only the rendezvous is added here.
    several = {**node, "PET_NPROC_PER_NODE": "4"}
    assert from_trainer_v2(several) == {"MASTER_ADDR": "job-node-0-0.job", "MASTER_PORT": "29400"}
    children = child_envs({**several, **from_trainer_v2(several)}, 4)
    assert [(e["RANK"], e["WORLD_SIZE"], e["MASTER_PORT"]) for e in children] == [
        (str(8 + i), "12", "29400") for i in range(4)
    ]
    # The training-operator (RANK set) and a lone process are left alone.
    assert from_trainer_v2({"RANK": "1", "WORLD_SIZE": "2", "PET_NODE_RANK": "1"}) == {}
    assert from_trainer_v2({}) == {}


def test_deepspeed_config(base_config: dict[str, Any]) -> None:
    cfg = TrainerConfig.model_validate(merged(base_config, training={"precision": "bf16", "zeroStage": 3}))
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * 2 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["gradient_clipping"] == 1.0
