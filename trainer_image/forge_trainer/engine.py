"""The distributed environment and the explicit DeepSpeed engine: schedule, optimizer, train step, evaluation."""

from __future__ import annotations

import datetime
import math
import os
import random
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf

from forge_trainer import sharded
from forge_trainer.config import TrainerConfig, TrainingSettings
from forge_trainer.data.loader import IGNORE_INDEX, MicroBatch
from forge_trainer.errors import DistributedError
from forge_trainer.model import load_model
from forge_trainer.pace import OwnTime


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


def build_model(model_dir: Path, cfg: TrainerConfig, world_size: int) -> torch.nn.Module:
    """The model to hand the engine: under ZeRO-3 built partitioned (no rank ever holds all of it), else whole."""
    t = cfg.training
    if t.zero_stage == 3:
        ds_config = deepspeed_config(cfg, world_size)
        return sharded.build_partitioned(model_dir, cfg.model, ds_config, t.activation_checkpointing)
    return load_model(model_dir, cfg.model, t.activation_checkpointing)


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


def token_loss_sum(
    model: Any, ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions).

    ``positions``: position ids that restart at each document (with no attention mask, transformers then confines
    attention to each document); None: plain causal attention over the sequence.

    ``chunk_tokens`` > 0: the model returns its final hidden states only, and the output projection and the
    cross-entropy run ``chunk_tokens`` positions at a time (:class:`ChunkedLinearCrossEntropy`), so the logits of the
    whole micro-batch never exist. 0: the model's full logits, cast to fp32.
    """
    shift_labels = labels[:, 1:].reshape(-1)
    count = (shift_labels != IGNORE_INDEX).sum()
    if chunk_tokens > 0:
        out = model(
            input_ids=ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=_NO_POSITIONS.to(ids.device),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][:, :-1, :].reshape(-1, out.hidden_states[-1].shape[-1])
        head = output_head(model)
        total: torch.Tensor = ChunkedLinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
            hidden, head.weight, shift_labels, chunk_tokens
        )
        return total, count
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    total = nnf.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, count


# logits_to_keep as an empty index: the model's own head projects no position (transformers' slice_logits_to_keep).
_NO_POSITIONS = torch.zeros(0, dtype=torch.long)


def output_head(model: Any) -> torch.nn.Linear:
    """The output projection (lm_head) of a causal LM, under a DeepSpeed engine and a peft wrapper."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise TypeError(f"chunked loss needs a bias-free Linear output head, not {type(head).__name__}")
    return head


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight^T, label_i) over labelled i, ``chunk`` positions at a time.

    The forward pass computes each chunk's logits in fp32, its loss, and at once its gradients (softmax minus the
    one-hot target), accumulated into d(hidden) and d(weight); the backward pass only scales them by the incoming
    gradient. Peak extra memory is one chunk's logits instead of the micro-batch's (plus d(weight) in fp32 when the
    head trains), with no recomputation. The loss is a scalar sum, so the gradient is linear in the incoming one.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            logits = nnf.linear(h, weight).float()
            total += nnf.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            if grad_h is None and grad_w is None:
                continue
            grad = torch.softmax(logits, dim=-1)
            del logits
            grad[torch.arange(y.shape[0], device=y.device), y.clamp(min=0)] -= 1.0
            grad *= (y != IGNORE_INDEX).unsqueeze(1)
            g = grad.to(hidden.dtype)
            del grad
            if grad_h is not None:
                grad_h[start : start + chunk] = g @ weight
            if grad_w is not None:
                grad_w += g.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return dh, dw, None, None


def train_step(
    engine: Any,
    micro: list[MicroBatch],
    global_loss_tokens: int,
    world_size: int,
    chunk_tokens: int = 0,
    own: OwnTime | None = None,
) -> torch.Tensor:
    """One optimizer step; returns this rank's part of the step's token-mean loss (sum over ranks = the loss).

    ``own`` times the forward passes and losses: the rank's own compute, before any collective (pace.OwnTime).

    Each micro-batch loss is its cross-entropy sum divided by the labelled tokens of the whole global step, times
    world*accumulation to cancel DeepSpeed's averaging over micro-batches and ranks: the gradient is exactly the
    gradient of the mean over every labelled token of the step, however they fall into micro-batches.
    """
    device = engine.device
    accum = len(micro)
    scale = world_size * accum / max(1, global_loss_tokens)
    local = torch.zeros((), device=device, dtype=torch.float32)
    for batch in micro:
        ids, labels = batch.ids.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
        positions = None if batch.positions is None else batch.positions.to(device, non_blocking=True)
        with nullcontext() if own is None else own.forward():
            total, _ = token_loss_sum(engine, ids, labels, chunk_tokens, positions)
        loss = total * scale
        engine.backward(loss)
        engine.step()
        local += loss.detach().float() / (world_size * accum)
    return local
