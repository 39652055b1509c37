"""The distributed environment and the explicit DeepSpeed engine: schedule, optimizer, train step, evaluation."""

from __future__ import annotations

import datetime
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

from forge_trainer.config import TrainerConfig, TrainingSettings
from forge_trainer.data.loader import IGNORE_INDEX
from forge_trainer.errors import DistributedError


@dataclass(frozen=True)
class DistEnv:
    """The process's place in the job, from the Kubeflow PyTorchJob environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, reports and writes shared checkpoint files."""
        return self.rank == 0


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment {name}={raw!r} is not an integer") from None


def dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read RANK, WORLD_SIZE, LOCAL_RANK (default 0), MASTER_ADDR, MASTER_PORT; a lone process is rank 0 of 1."""
    e = os.environ if env is None else env
    world = _int_env(e, "WORLD_SIZE", 1)
    rank = _int_env(e, "RANK", 0)
    local = _int_env(e, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"environment RANK={rank} is outside WORLD_SIZE={world}")
    if local < 0:
        raise DistributedError(f"environment LOCAL_RANK={local} is negative")
    return DistEnv(rank, world, local, e.get("MASTER_ADDR", "127.0.0.1"), _int_env(e, "MASTER_PORT", 29500))


def init_distributed(denv: DistEnv, timeout_s: int = 1800) -> None:
    """Join the process group (NCCL on GPU, gloo on CPU) with the env:// rendezvous at MASTER_ADDR:MASTER_PORT."""
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(denv.local_rank))  # without it DeepSpeed tries MPI discovery
    os.environ.setdefault("RANK", str(denv.rank))
    os.environ.setdefault("WORLD_SIZE", str(denv.world_size))
    os.environ.setdefault("MASTER_ADDR", denv.master_addr)
    os.environ.setdefault("MASTER_PORT", str(denv.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def seed_everything(seed: int, rank: int) -> None:
    """Seed every RNG; ranks differ (dropout masks) but each is reproducible."""
    s = seed + 1000003 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def lr_factor(t: TrainingSettings, step: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step with 0-based index ``step``."""
    peak, floor = t.learning_rate, t.min_learning_rate
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    floor_f = floor / peak
    if t.schedule == "constant":
        return 1.0
    if t.schedule == "cosine":
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return floor_f + (1.0 - floor_f) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(t.max_steps * t.decay_percent / 100))
    decay_start = t.max_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor_f) * progress


def deepspeed_config(cfg: TrainerConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run."""
    t = cfg.training
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True)
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": cfg.global_batch_sequences(world_size),
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": zero,
        # bf16 needs no loss scaling; DeepSpeed's overflow check would cost an all-reduce and two host syncs per step.
        # A non-finite step is then applied, and the guard stops the run at the next read-back without saving it.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, t: TrainingSettings) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA); no weight decay on biases and norms."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(
        groups,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=torch.cuda.is_available(),
    )


def build_engine(model: torch.nn.Module, cfg: TrainerConfig, world_size: int) -> Any:
    """deepspeed.initialize with our optimizer and schedule (both saved in DeepSpeed checkpoints)."""
    import deepspeed

    t = cfg.training
    optimizer = build_optimizer(model, t)
    factor: Callable[[int], float] = lambda step: lr_factor(t, step)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
        dist_init_required=False,
    )
    if t.compile:
        engine.compile()
    return engine


def token_loss_sum(model: Any, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    logits = model(input_ids=ids).logits
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    total = nnf.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def train_step(
    engine: Any, micro: list[tuple[torch.Tensor, torch.Tensor]], global_loss_tokens: int, world_size: int
) -> torch.Tensor:
    """One optimizer step; returns this rank's part of the step's token-mean loss (sum over ranks = the loss).

    Each micro-batch loss is its cross-entropy sum divided by the labelled tokens of the whole global step, times
    world*accumulation to cancel DeepSpeed's averaging over micro-batches and ranks: the gradient is exactly the
    gradient of the mean over every labelled token of the step, however they fall into micro-batches.
    """
    device = engine.device
    accum = len(micro)
    scale = world_size * accum / max(1, global_loss_tokens)
    local = torch.zeros((), device=device, dtype=torch.float32)
    for ids, labels in micro:
        total, _ = token_loss_sum(engine, ids.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        loss = total * scale
        engine.backward(loss)
        engine.step()
        local += loss.detach().float() / (world_size * accum)
    return local
