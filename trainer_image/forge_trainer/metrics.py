"""Prometheus metrics, served by every rank on metricsPort + LOCAL_RANK (a label named `job` is avoided)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

LABELS = ("forge_job", "namespace", "rank")

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU estimate.
PEAK_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def device_peak_flops() -> float | None:
    """Peak bf16 FLOP/s of this process's GPU; FORGE_PEAK_TFLOPS overrides; None on CPU or an unknown GPU."""
    override = os.environ.get("FORGE_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def flops_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*H*S for attention scores (PaLM's estimate)."""
    return 6.0 * params + 12.0 * layers * hidden * seq_len


@dataclass
class TrainerMetrics:
    """The metric families of one rank, with the rank's fixed label values."""

    registry: CollectorRegistry
    labels: dict[str, str]
    step: Gauge
    total_steps: Gauge
    tokens: Counter
    tokens_per_second: Gauge
    loss: Gauge
    learning_rate: Gauge
    grad_norm: Gauge
    mfu: Gauge
    compile_seconds: Gauge
    prepare_seconds: Gauge
    checkpoints: Counter
    eval_loss: Gauge
    forgetting: Gauge
    domain_gain: Gauge
    kl_base: Gauge
    general_source_loss: Gauge
    general_source_forgetting: Gauge
    data_tokens: Gauge
    forgetting_budget: Gauge
    guard_verdicts: Counter
    rank_step_seconds: Gauge
    straggler: Gauge
    data_wait: Gauge
    port: int | None = None

    def set(self, gauge: Gauge, value: float, **extra: str) -> None:
        """Set a gauge of this rank."""
        gauge.labels(**self.labels, **extra).set(value)

    def inc(self, counter: Counter, amount: float = 1.0, **extra: str) -> None:
        """Increase a counter of this rank."""
        counter.labels(**self.labels, **extra).inc(amount)


def create_metrics(forge_job: str, namespace: str, rank: int) -> TrainerMetrics:
    """Metric families in a private registry, with this rank's labels bound."""
    reg = CollectorRegistry()
    base = list(LABELS)

    def g(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, [*base, *extra], registry=reg)

    return TrainerMetrics(
        registry=reg,
        labels={"forge_job": forge_job, "namespace": namespace, "rank": str(rank)},
        step=g("forge_trainer_step", "Optimizer steps done."),
        total_steps=g("forge_trainer_total_steps", "Optimizer steps of the run."),
        tokens=Counter("forge_trainer_tokens", "Training tokens processed by this rank.", base, registry=reg),
        tokens_per_second=g("forge_trainer_tokens_per_second", "Training tokens per second of this rank."),
        loss=g("forge_trainer_loss", "Training loss of the last step (token mean over all ranks)."),
        learning_rate=g("forge_trainer_learning_rate", "Learning rate of the last step."),
        grad_norm=g("forge_trainer_grad_norm", "Global gradient norm of the last step (before clipping)."),
        mfu=g("forge_trainer_mfu_ratio", "Model FLOPs utilisation estimate against the GPU's bf16 peak (0-1)."),
        compile_seconds=g(
            "forge_trainer_compile_seconds",
            "Duration of the compile phase: the first training step of this process with training.compile.",
        ),
        prepare_seconds=g(
            "forge_trainer_prepare_seconds",
            "Duration of the prepare phase: training files tokenised into token shards (or found in the cache).",
        ),
        checkpoints=Counter("forge_trainer_checkpoints_saved", "Complete checkpoints written.", base, registry=reg),
        eval_loss=g("forge_trainer_eval_loss", "Held-out loss by set (domain, general).", ("set",)),
        forgetting=g("forge_trainer_forgetting_percent", "Relative rise of the general held-out loss over the base."),
        domain_gain=g("forge_trainer_domain_gain_percent", "Relative fall of the domain held-out loss under the base."),
        kl_base=g(
            "forge_trainer_kl_base_nats",
            "KL(base || model) per general held-out token, from the base's cached top-k (a lower bound).",
        ),
        general_source_loss=g(
            "forge_trainer_general_source_loss", "General held-out loss per source (eval.general).", ("source",)
        ),
        general_source_forgetting=g(
            "forge_trainer_general_source_forgetting_percent",
            "Forgetting per general held-out source, against the base model's loss on that source.",
            ("source",),
        ),
        data_tokens=g(
            "forge_trainer_data_tokens", "Tokens drawn from each source in the global stream.", ("group", "source")
        ),
        forgetting_budget=g("forge_trainer_forgetting_budget_percent", "The forgetting budget (spec.forgetting)."),
        guard_verdicts=Counter(
            "forge_trainer_guard_verdicts",
            "Guard rules that fired, by reason (LearningRateTooHigh, LossDiverged, ...).",
            [*base, "reason"],
            registry=reg,
        ),
        rank_step_seconds=g(
            "forge_trainer_rank_step_seconds",
            "Median own compute seconds of this rank's recent steps (forward passes and losses, before the gradient "
            "all-reduce where every rank waits for the slowest).",
        ),
        straggler=g("forge_trainer_straggler_rank", "1 while the trainer names this rank a straggler, else 0."),
        data_wait=g(
            "forge_trainer_data_wait_ratio",
            "Share of this rank's recent step wall time spent waiting for the next batch (0-1).",
        ),
    )


def serve(m: TrainerMetrics, port: int) -> int | None:
    """Start the /metrics endpoint; a port that cannot be bound is logged, never fatal. Returns the port."""
    try:
        server, _ = start_http_server(port, addr="0.0.0.0", registry=m.registry)
    except OSError as err:
        log.warning("metrics endpoint not started on port %d: %s", port, err)
        return None
    actual = int(server.server_address[1])
    m.port = actual
    log.info("metrics on :%d/metrics", actual)
    return actual


def metrics_port(configured: int, local_rank: int) -> int:
    """FORGE_METRICS_PORT overrides the config; each local process adds its LOCAL_RANK (0 stays 0: any port)."""
    raw = os.environ.get("FORGE_METRICS_PORT")
    base = int(raw) if raw else configured
    return base + local_rank if base else 0
