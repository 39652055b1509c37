"""The trainer config: the one written contract between the operator (which renders it) and the trainer.

The operator renders a JSON document (camelCase keys) into the ConfigMap ``<job>-config``; every rank reads it
with :func:`load_config`. Every "auto" value of the ForgeJob spec is already resolved to a number here. Unknown
keys are rejected so that a typo or a version skew between operator and trainer fails at start, naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from forge_trainer.errors import ConfigError

CONFIG_VERSION = 1

Technique = Literal["cpt", "sft", "lora"]
Schedule = Literal["cosine", "constant", "wsd"]
Precision = Literal["fp32", "bf16"]
EvalGroup = Literal["domain", "general", "unseen"]
DOMAIN_GROUP: EvalGroup = "domain"
GENERAL_GROUP: EvalGroup = "general"
UNSEEN_GROUP: EvalGroup = "unseen"
ForgettingAction = Literal["stop", "warn", "rebalance"]

# A URI is a local path (absolute or relative to the working directory) or "s3://bucket/key-or-prefix".
Uri = Annotated[str, Field(min_length=1, max_length=2048)]


class _Model(BaseModel):
    """Base of every config block: camelCase JSON keys, snake_case attributes, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        validate_default=True,
    )

    def to_json_dict(self) -> dict[str, Any]:
        """The camelCase JSON form, as the operator renders it."""
        return self.model_dump(mode="json", by_alias=True)


class Source(_Model):
    """One data source: a file, a local folder or an S3 prefix, with its weight inside its group."""

    uri: Uri = Field(
        description=(
            "Local file or folder, or s3://bucket/prefix (a prefix ending in '/' is a folder; files are read in "
            'sorted key order). Files: *.jsonl with {"text": ...} or {"messages": [{"role", "content"}]}, '
            "*.txt (one document per file); a '.gz' suffix is decompressed. Other files are ignored."
        )
    )
    weight: int = Field(
        default=1,
        ge=1,
        le=1_000_000,
        description="Relative share of this source's group, in tokens (weights are normalised within the group).",
    )


class LoraSettings(_Model):
    """LoRA adapter settings (peft); used only with technique 'lora'."""

    rank: int = Field(default=16, ge=1, le=1024, description="Adapter rank r.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator: updates are scaled by alpha/rank.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names (suffixes) of the linear modules that get adapters, e.g. q_proj, v_proj.",
    )


class ModelSettings(_Model):
    """The base model and how it is trained."""

    base: Uri = Field(
        description=(
            "Hugging Face model folder (config.json, *.safetensors, tokenizer files): a local path or "
            "s3://bucket/prefix/, copied to local disk first."
        )
    )
    technique: Technique = Field(
        description=(
            "cpt: language-model loss on every token. sft: loss on assistant tokens of chat records only (text "
            "records keep every token). lora: as sft, training LoRA adapters only (merged into the weights on export)."
        )
    )
    lora: LoraSettings | None = Field(
        default=None, description="LoRA settings; required when technique is 'lora', forbidden otherwise."
    )
    attention_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        default="sdpa",
        description=(
            "The attention kernel (transformers' attn_implementation): sdpa (PyTorch's scaled_dot_product_attention, "
            "everywhere), flash_attention_2 (the flash-attn package on CUDA GPUs: variable-length kernels for "
            "per-document attention, no mask materialised) or eager (reference)."
        ),
    )

    @model_validator(mode="after")
    def _lora_matches_technique(self) -> ModelSettings:
        if self.technique == "lora" and self.lora is None:
            raise ValueError("technique 'lora' needs a 'lora' block")
        if self.technique != "lora" and self.lora is not None:
            raise ValueError(f"a 'lora' block is only allowed with technique 'lora', not {self.technique!r}")
        return self


class DataSettings(_Model):
    """Training data and how domain and general tokens are mixed."""

    domain_percent: int = Field(
        ge=1, le=100, description="Share of training TOKENS drawn from the domain sources, in percent."
    )
    domain: list[Source] = Field(min_length=1, description="Domain sources (the user's data).")
    general: list[Source] = Field(
        default_factory=list,
        description="General (curated) sources that protect general abilities; may be empty only at domainPercent 100.",
    )
    seq_length: int = Field(ge=8, le=1_048_576, description="Tokens per packed training sequence.")
    max_repetition: float = Field(
        default=4.0,
        ge=1.0,
        le=1000.0,
        description=(
            "How many passes over a source are allowed to fill its share (1 = never repeat). A source that runs "
            "out beyond this fails the run with an 'insufficient tokens' error."
        ),
    )
    max_bad_lines: int = Field(
        default=100,
        ge=0,
        description=(
            "Malformed records (bad JSON, missing text/messages, invalid UTF-8) skipped per source before the run "
            "fails, naming the file and line of the record that crossed the limit."
        ),
    )
    max_record_bytes: int = Field(
        default=64 << 20,
        ge=1024,
        le=1 << 30,
        description=(
            "Largest record read into memory: a jsonl line (newline excluded) or a whole .txt file longer than this "
            "is a bad record (counted against maxBadLines, named by file and line), skipped in bounded chunks."
        ),
    )
    cross_document_attention: bool = Field(
        default=False,
        description=(
            "Tokens attend to the earlier documents packed into the same sequence (plain causal attention over the "
            "sequence). False: position ids restart at every document and attention stays inside it."
        ),
    )
    mix_by: Literal["tokens", "lossTokens"] = Field(
        default="tokens",
        description=(
            "What domainPercent counts: every input token, or only the tokens that carry loss (the gradient's "
            "shares; differs from tokens for sft and lora, whose prompt tokens carry none)."
        ),
    )
    token_cache: Uri | None = Field(
        default=None,
        description=(
            "Where the token shards of the training sources are kept: a local folder or s3://bucket/prefix/. "
            "Default: <checkpoints.output>/token-cache/. Point several jobs at one location to share shards."
        ),
    )
    cache_tokens: bool = Field(
        default=True,
        description=(
            "Tokenise each training file once, split over the ranks, into token shards in tokenCache (reused by "
            "restarts and later runs); training reads them memory-mapped. False: every rank tokenises the whole "
            "stream while training."
        ),
    )

    @model_validator(mode="after")
    def _general_needed(self) -> DataSettings:
        if self.domain_percent < 100 and not self.general:
            raise ValueError(f"general sources are required when domainPercent is {self.domain_percent} (< 100)")
        return self


# Bounds of eval.holdOutPerMille: at least one document in a thousand, at most a quarter of the training data.
HOLD_OUT_PER_MILLE_MIN, HOLD_OUT_PER_MILLE_MAX = 1, 250


class EvalSettings(_Model):
    """Held-out evaluation sets, fixed for the whole run (the first maxTokens tokens of each group)."""

    every_steps: int = Field(default=100, ge=1, description="Evaluate every this many optimizer steps.")
    domain: list[Source] = Field(
        default_factory=list,
        description=(
            "Held-out domain sources. Empty: holdOutPerMille of the data.domain documents are held out (chosen by a "
            "hash of each document) and never trained on."
        ),
    )
    general: list[Source] = Field(
        default_factory=list,
        description=(
            "Held-out general sources (forgetting). Empty: holdOutPerMille of the data.general documents are held "
            "out (chosen by a hash of each document) and never trained on."
        ),
    )
    unseen_general: list[Source] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "General text from neither training set, never replayed: forgetting is also measured here, and the worse "
            "of this and the general set's forgetting is what the budget, the guard and selection judge (replay "
            "lowers the loss on its own distribution by construction)."
        ),
    )
    hold_out_per_mille: int = Field(
        default=20,
        ge=HOLD_OUT_PER_MILLE_MIN,
        le=HOLD_OUT_PER_MILLE_MAX,
        description=(
            "Documents per thousand of a training source held out for evaluation when that group's eval sources "
            "are empty (data/holdout.py: a hash of the document's tokens decides)."
        ),
    )
    max_tokens: int = Field(
        default=262_144, ge=1, description="Tokens evaluated per group (domain, general), split by source weight."
    )
    kl_top_k: int = Field(
        default=16,
        ge=0,
        le=1024,
        description=(
            "KL(base || model) on the general held-out tokens from the base model's top-k log-probabilities, cached "
            "at the baseline (the rest of the base's mass is one bucket: a lower bound of the full KL). 0 = off."
        ),
    )


def replayed_unseen(unseen: list[str], training: list[str]) -> tuple[int, str] | None:
    """The first never-replayed eval uri that is also a training uri: (its index, why it is refused); None if none."""
    trained = set(training)
    for i, uri in enumerate(unseen):
        if uri in trained:
            return i, f"{uri} is also a training source (data.domain or data.general), so it is not unseen"
    return None


class FieldValueError(ValueError):
    """A cross-block check that fails on one field: reported with that field's path instead of the block's."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class ProbeSettings(_Model):
    """The learning-rate probe: short runs at multiples of learningRate before training, to pick the highest rate
    whose forgetting, projected to the whole run, stays within forgetting.budgetPercent (docs/trainer.md)."""

    multipliers: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
        min_length=1,
        max_length=8,
        description="Multiples of learningRate probed (distinct; probed in ascending order).",
    )
    steps: int = Field(
        default=20,
        ge=2,
        le=100_000,
        description="Optimizer steps of each probe run (at most maxSteps), on the real mixed stream from its start.",
    )
    evaluations: int = Field(
        default=4,
        ge=1,
        le=100,
        description="Held-out evaluations per probe run, evenly spaced, the last one at its final step (<= steps).",
    )
    eval_max_tokens: int = Field(
        default=32_768,
        ge=1,
        description=(
            "Tokens of each held-out group (domain, general) per probe evaluation: the first ones of the eval sets, "
            "at most eval.maxTokens. Fewer than the run's evaluations, to keep the probe cheap."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> ProbeSettings:
        if len(set(self.multipliers)) != len(self.multipliers):
            raise ValueError(f"multipliers must be distinct: {self.multipliers}")
        if self.evaluations > self.steps:
            raise ValueError(f"evaluations ({self.evaluations}) exceeds steps ({self.steps})")
        return self


class TrainingSettings(_Model):
    """Optimisation settings, already resolved by the operator (no 'auto' here)."""

    learning_rate: float = Field(gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    min_learning_rate: float = Field(default=0.0, ge=0.0, description="Floor the cosine and wsd schedules decay to.")
    schedule: Schedule = Field(
        default="cosine",
        description=(
            "Learning-rate schedule after linear warmup: cosine decay to minLearningRate, constant, or wsd "
            "(warmup-stable-decay: constant, then linear decay over the last decayPercent of steps)."
        ),
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps from 0 to the peak rate.")
    decay_percent: int = Field(
        default=20, ge=1, le=100, description="wsd only: share of maxSteps spent in the final decay, in percent."
    )
    micro_batch_size: int = Field(ge=1, le=4096, description="Sequences per rank per forward pass.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=65536, description="Micro-batches accumulated per optimizer step."
    )
    global_batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "If set, checked at start: must equal microBatchSize * gradientAccumulationSteps * worldSize * seqLength."
        ),
    )
    max_steps: int = Field(ge=1, description="Optimizer steps of the run.")
    precision: Precision = Field(default="bf16", description="Training precision: fp32, or bf16 (mixed, fp32 master).")
    zero_stage: int = Field(default=2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    seed: int = Field(default=1234, ge=0, le=2**32 - 1, description="Seed of model init noise, dropout and data order.")
    gradient_clipping: float = Field(default=1.0, ge=0.0, description="Global gradient-norm clip (0 = off).")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(default=0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(default=1e-8, gt=0.0, le=1.0, description="AdamW epsilon.")
    activation_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory, ~30% more compute)."
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model (GPU; the first steps' compile time is reported as the compile phase).",
    )
    loss_chunk_tokens: int = Field(
        default=0,
        ge=0,
        le=1_048_576,
        description=(
            "Positions per chunk of the chunked linear cross-entropy: the output projection and the loss run this "
            "many positions at a time, so the fp32 logits of the whole micro-batch never exist (the model must "
            "accept logits_to_keep, as transformers' causal LMs do; not with zeroStage 3). 0 = full logits."
        ),
    )
    log_every_steps: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description=(
            "Steps between read-backs of the training figures (one all-reduce and one device sync each; also at "
            "every evaluation and checkpoint). Losses and gradient norms of every step stay on the device until then; "
            "every step is still logged and seen by the guard, at most this many steps late."
        ),
    )
    probe: ProbeSettings | None = Field(
        default=None,
        description=(
            "Learning-rate probe before training (null = off): the run then trains at the highest probed multiple "
            "of learningRate (and minLearningRate) projected within the forgetting budget. Needs eval.general."
        ),
    )

    @model_validator(mode="after")
    def _schedule_bounds(self) -> TrainingSettings:
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmupSteps ({self.warmup_steps}) exceeds maxSteps ({self.max_steps})")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"minLearningRate ({self.min_learning_rate}) exceeds learningRate ({self.learning_rate})")
        if self.loss_chunk_tokens and self.zero_stage == 3:
            raise FieldValueError(
                "training.lossChunkTokens",
                "the chunked loss needs zeroStage 0-2 (the output head's weight is partitioned under ZeRO-3); set 0",
            )
        if self.probe is not None:
            if self.probe.steps > self.max_steps:
                raise FieldValueError("training.probe.steps", f"{self.probe.steps} exceeds maxSteps ({self.max_steps})")
            highest = self.learning_rate * max(self.probe.multipliers)
            if highest > 1.0:
                raise FieldValueError(
                    "training.probe.multipliers",
                    f"learningRate {self.learning_rate:g} x {max(self.probe.multipliers):g} = {highest:g} exceeds 1",
                )
        return self


class ForgettingSettings(_Model):
    """Forgetting budget (extended by the guard, issue 5)."""

    budget_percent: float = Field(
        default=2.0,
        ge=0.0,
        le=1000.0,
        description="Largest allowed relative rise of the general eval loss over the base model, in percent.",
    )
    action: ForgettingAction = Field(
        default="stop", description="What happens when the budget is exceeded: stop, warn, or rebalance the mix."
    )
    confidence_percent: int = Field(
        default=80,
        ge=50,
        le=99,
        description=(
            "How sure the forgetting rule must be that a run is over the budget, in percent: it acts when "
            "forgetting - z x its standard error > budget (z of this one-sided confidence; 50: the measured value)."
        ),
    )
    grace_steps: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Steps before the forgetting, progress, divergence and grad-norm rules may fire (the stability gap); "
            "null = 10% of maxSteps. A non-finite loss always fires at once."
        ),
    )
    grace_evals: int = Field(
        default=2, ge=0, le=1000, description="Evaluations after the baseline before forgetting/progress rules fire."
    )
    divergence_factor: float = Field(
        default=3.0, gt=1.0, le=1000.0, description="Loss divergence: train loss above this x its best smoothed value."
    )
    grad_spike_factor: float = Field(
        default=10.0, gt=1.0, le=1e6, description="Grad-norm spike: a norm above this x the running median."
    )
    grad_spike_steps: int = Field(
        default=5, ge=1, le=100_000, description="Consecutive observed spike steps before the rule fires."
    )
    slope_window_evals: int = Field(
        default=3,
        ge=2,
        le=1000,
        description="Evaluations over which the slope of forgetting against the cumulative learning rate is fitted.",
    )
    lr_too_high_factor: float = Field(
        default=3.0,
        ge=1.0,
        le=1000.0,
        description=(
            "Reason LearningRateTooHigh (else ForgettingBudgetExceeded) when the forgetting projected to the end of "
            "the run exceeds this x the budget."
        ),
    )
    no_progress_evals: int = Field(
        default=5, ge=1, le=1000, description="No domain progress: evaluations without a gain improvement."
    )
    min_domain_gain_percent: float = Field(
        default=0.1, ge=0.0, le=100.0, description="Improvement of the domain gain (points) that counts as progress."
    )


class CandidateSettings(_Model):
    """End-of-run candidates built from the checkpoints' Hugging Face exports and evaluated on the held-out sets."""

    average_last: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Uniform weight average of the last k complete checkpoints (needs at least 2; 0 or 1 = off).",
    )
    interpolation_alphas: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        max_length=16,
        description=(
            "WiSE-FT: (1 - alpha) * base + alpha * the last checkpoint, one candidate per alpha (empty = off)."
        ),
    )

    @model_validator(mode="after")
    def _distinct_alphas(self) -> CandidateSettings:
        if len(set(self.interpolation_alphas)) != len(self.interpolation_alphas):
            raise ValueError(f"interpolationAlphas must be distinct: {self.interpolation_alphas}")
        return self


class CheckpointSettings(_Model):
    """Where and how often checkpoints are written."""

    every_steps: int = Field(ge=1, description="Save a checkpoint every this many optimizer steps (and at the end).")
    output: Uri = Field(
        description=(
            "Durable destination: local path or s3://bucket/prefix/. Each checkpoint is <output>/step-NNNNNNNN/ "
            "and is complete only once its forge-manifest.json exists (written last)."
        )
    )
    keep: int = Field(
        default=3,
        ge=1,
        le=10_000,
        description=(
            "Complete checkpoints kept on local disk (newest); older ones are removed before the next save. "
            "When the output is the local folder itself, this bounds the output too."
        ),
    )
    keep_resumable: int = Field(
        default=2,
        ge=1,
        le=10_000,
        description=(
            "The newest complete checkpoints that keep their training state (optimizer, RNG) in the output, so that "
            "a run can resume from them; older ones keep it too while they are selected or on the Pareto set."
        ),
    )
    output_retention: Literal["keepAll", "dropOptimizerState"] = Field(
        default="dropOptimizerState",
        description=(
            "dropOptimizerState: after each save, drop the training state of the output's checkpoints beyond "
            "keepResumable that are neither selected nor on the Pareto set (their hf/ export stays); keepAll: "
            "keep every checkpoint whole."
        ),
    )
    background_upload: bool = Field(
        default=True,
        description=(
            "Upload each checkpoint in a background thread while training goes on (the checkpoint is complete "
            "once every rank's upload is confirmed). False waits for the uploads at the save (for comparisons)."
        ),
    )
    local_dir: str = Field(
        default="/tmp/forge/checkpoints",
        min_length=1,
        description="Node-local scratch folder for checkpoints (shared by the ranks of one node).",
    )
    export_hf: bool = Field(
        default=True,
        description="Also write a Hugging Face safetensors folder (hf/) into every checkpoint (LoRA merged).",
    )
    candidates: CandidateSettings = Field(
        default_factory=CandidateSettings,
        description=(
            "Averages and interpolations built at the end of the run (also after a guard stop) from the hf/ "
            "exports; written to <output>/candidates/<name>/ and reported with the checkpoints. Needs exportHf."
        ),
    )


class ForgeJobRef(_Model):
    """The ForgeJob whose /status the trainer patches."""

    group: Literal["forge.dev"] = Field(default="forge.dev", description="API group of the ForgeJob CRD.")
    version: Literal["v1alpha1"] = Field(default="v1alpha1", description="API version of the ForgeJob CRD.")
    plural: Literal["forgejobs"] = Field(default="forgejobs", description="Plural resource name.")
    namespace: str = Field(min_length=1, max_length=253, description="Namespace of the ForgeJob.")
    name: str = Field(min_length=1, max_length=253, description="Name of the ForgeJob.")


class ReportSettings(_Model):
    """Status reporting (rank 0) and the Prometheus endpoint (every rank)."""

    forge_job: ForgeJobRef | None = Field(
        default=None, description="ForgeJob to report progress and checkpoints to; null disables status reports."
    )
    min_interval_seconds: float = Field(
        default=30.0,
        ge=0.0,
        le=3600.0,
        description=(
            "At most one status patch per this many seconds; an evaluation, a checkpoint or another event is sent "
            "within a second."
        ),
    )
    metrics_port: int = Field(
        default=9400,
        ge=0,
        le=65535,
        description=(
            "Prometheus /metrics port; each local process listens on metricsPort + LOCAL_RANK. 0 picks a free port "
            "(logged). Environment FORGE_METRICS_PORT overrides it."
        ),
    )


class WatchdogConfig(_Model):
    """The hang watchdog of every rank (forge_trainer/watchdog.py)."""

    multiple: float = Field(
        default=10.0, ge=2.0, le=1000.0, description="A step is hung past this multiple of the recent median step."
    )
    floor_seconds: float = Field(
        default=300.0,
        ge=1.0,
        le=86_400.0,
        description="Never hung before this many seconds (covers the first steps, which have no median yet).",
    )


class PaceConfig(_Model):
    """Stragglers and throughput drops (forge_trainer/pace.py): reported, never acted on."""

    straggler_percent: int = Field(
        default=130,
        ge=101,
        le=1000,
        description="A rank whose own step time is above this percentage of the other ranks' median is slow.",
    )
    drop_percent: int = Field(
        default=50,
        ge=1,
        le=99,
        description="The job's tokens/s below this percentage of its running median is a throughput drop.",
    )
    read_backs: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="A slow rank or a drop is reported once it held this many read-backs in a row (and cleared "
        "once it has not for as many).",
    )


class TrainerConfig(_Model):
    """The whole trainer config (JSON, camelCase)."""

    version: Literal[1] = Field(description="Contract version; this trainer reads version 1.")
    job_name: str = Field(min_length=1, max_length=253, description="Name of the ForgeJob (used in logs and metrics).")
    namespace: str = Field(min_length=1, max_length=253, description="Namespace of the ForgeJob.")
    model: ModelSettings = Field(description="Base model and technique.")
    data: DataSettings = Field(description="Training data and mixing.")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Held-out evaluation sets.")
    training: TrainingSettings = Field(description="Optimisation.")
    forgetting: ForgettingSettings = Field(default_factory=ForgettingSettings, description="Forgetting budget.")
    checkpoints: CheckpointSettings = Field(description="Checkpoint cadence and destination.")
    report: ReportSettings = Field(default_factory=ReportSettings, description="Status reports and metrics.")
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig, description="When a training step is hung.")
    pace: PaceConfig = Field(default_factory=PaceConfig, description="Stragglers and throughput drops.")

    @model_validator(mode="after")
    def _probe_measures_forgetting(self) -> TrainerConfig:
        if self.training.probe is not None and not self.eval_group(GENERAL_GROUP)[0]:
            raise FieldValueError(
                "training.probe", "needs general sources (eval.general or data.general) to measure forgetting"
            )
        return self

    @model_validator(mode="after")
    def _unseen_is_never_trained_on(self) -> TrainerConfig:
        problem = replayed_unseen(
            [s.uri for s in self.eval.unseen_general], [s.uri for s in self.data.domain + self.data.general]
        )
        if problem is not None:
            raise FieldValueError(f"eval.unseenGeneral[{problem[0]}].uri", problem[1])
        return self

    def eval_group(self, group: EvalGroup) -> tuple[list[Source], int]:
        """A held-out group's sources and the per-mille of their documents held out from training: the eval
        sources as given (0: whole files, held out by the user), else the group's training sources split by
        eval.holdOutPerMille. The unseen group is eval.unseenGeneral as given (never trained on)."""
        if group == UNSEEN_GROUP:
            return list(self.eval.unseen_general), 0
        given = self.eval.domain if group == DOMAIN_GROUP else self.eval.general
        if given:
            return list(given), 0
        training = self.data.domain if group == DOMAIN_GROUP else self.data.general
        return list(training), self.eval.hold_out_per_mille if training else 0

    def hold_out(self) -> tuple[int, int]:
        """Per-mille of the (domain, general) training documents held out for evaluation (0: none)."""
        return self.eval_group(DOMAIN_GROUP)[1], self.eval_group(GENERAL_GROUP)[1]

    def global_batch_sequences(self, world_size: int) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.training.micro_batch_size * self.training.gradient_accumulation_steps * world_size

    def check_world(self, world_size: int) -> None:
        """Checks that hold only once the world size is known; raises ConfigError naming the field."""
        gbt = self.training.global_batch_tokens
        if gbt is None:
            return
        actual = self.global_batch_sequences(world_size) * self.data.seq_length
        if actual != gbt:
            raise ConfigError(
                f"training.globalBatchTokens: {gbt} != microBatchSize {self.training.micro_batch_size} * "
                f"gradientAccumulationSteps {self.training.gradient_accumulation_steps} * worldSize {world_size} * "
                f"seqLength {self.data.seq_length} = {actual}"
            )


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(root)"


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: '<origin>: <field.path>: <message>'."""
    lines = []
    for e in err.errors():
        path = _field_path(tuple(e["loc"]))
        msg = e["msg"]
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldValueError):
            path, msg = cause.path, cause.message
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{origin}: {path}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, origin: str = "<config>") -> TrainerConfig:
    """Validate a decoded JSON document; raises ConfigError naming the origin and the field path."""
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


CHECKPOINT_LOCAL_DIR_ENV = "FORGE_CHECKPOINT_LOCAL_DIR"


def with_env_overrides(cfg: TrainerConfig, env: Mapping[str, str]) -> TrainerConfig:
    """The config with what the environment overrides: ``FORGE_CHECKPOINT_LOCAL_DIR`` -> checkpoints.localDir.

    A runtime that gives each pod its own scratch folder at another path (the local stand-in runs several pods on
    one machine) sets it; an empty value changes nothing.
    """
    local_dir = env.get(CHECKPOINT_LOCAL_DIR_ENV, "").strip()
    if not local_dir:
        return cfg
    checkpoints = cfg.checkpoints.model_copy(update={"local_dir": local_dir})
    return cfg.model_copy(update={"checkpoints": checkpoints})


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> TrainerConfig:
    """Read and validate the trainer config file, then apply :func:`with_env_overrides` (``env``: os.environ);
    errors name the file and the field path."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    return with_env_overrides(parse_config(data, str(p)), os.environ if env is None else env)
