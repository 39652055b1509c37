"""The ForgeJob API (forge.dev/v1alpha1): typed spec and status models, the single source of the CRD schema.

Field descriptions are the attribute docstrings below (pydantic ``use_attribute_docstrings``); ``forge_operator.crd``
turns these models into the CustomResourceDefinition in ``crds/forgejob.yaml``. The spec carries no floats: a
learning rate is a decimal string ("2e-5" or "auto"), ratios are integer percents. The status may carry floats
(losses, throughput), written by the trainer with merge patches on the ``/status`` subresource.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

GROUP = "forge.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "forge.dev/v1alpha1"
KIND: Final = "ForgeJob"
PLURAL = "forgejobs"
SINGULAR = "forgejob"
SHORT_NAME = "fj"

Technique = Literal["cpt", "sft", "lora"]
Schedule = Literal["cosine", "constant", "wsd"]
Precision = Literal["bf16", "fp32"]
MixBy = Literal["tokens", "lossTokens"]
AttentionImplementation = Literal["sdpa", "flash_attention_2", "eager"]
ForgettingAction = Literal["stop", "warn", "rebalance"]
SelectionPolicy = Literal["best-within-budget", "pareto", "last"]
CandidateKind = Literal["checkpoint", "average", "interpolation"]
RestartPolicy = Literal["OnFailure", "ExitCode", "Never"]
OutputRetention = Literal["dropOptimizerState", "keepAll"]
StallAction = Literal["restart", "fail", "warn"]
TrainerPhase = Literal["setup", "compile", "train", "evaluate", "candidates"]
ConditionStatus = Literal["True", "False", "Unknown"]
BackendName = Literal["pytorchjob", "trainjob"]
BACKENDS: tuple[BackendName, ...] = ("pytorchjob", "trainjob")
State = Literal[
    "Pending", "Invalid", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "EarlyStopped", "Failed"
]
STATES: tuple[State, ...] = (
    "Pending",
    "Invalid",
    "Queued",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "EarlyStopped",
    "Failed",
)
TERMINAL_STATES: frozenset[State] = frozenset({"Succeeded", "EarlyStopped", "Failed"})

# Reasons the trainer's guard reports in status.earlyStop (the CRD accepts any CamelCase word, so that a newer
# trainer's reason is never refused; the operator passes it through).
EARLY_STOP_REASONS: tuple[str, ...] = (
    "LearningRateTooHigh",
    "ForgettingBudgetExceeded",
    "LossDiverged",
    "NonFiniteLoss",
    "GradNormSpikes",
    "NoDomainProgress",
)
REASON_PATTERN = r"^[A-Z][A-Za-z0-9]*$"

# A positive decimal such as "2e-5", "0.0002", "3.5E-4"; range checks live in validation.py.
DECIMAL_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
LEARNING_RATE_PATTERN = r"^(auto|([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?)$"
# Kubernetes resource.Quantity, as the core API schema writes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
URI_MAX = 2048
# Bounds that keep a ForgeJob far below the API server's 1.5 MiB object limit (see tests/operator/test_status_size.py).
STATUS_TEXT_MAX = 2048
STATUS_CHECKPOINTS_MAX = 64
# Kubernetes allows 32 KiB per condition message; Forge keeps them to 8 KiB (longer ones are cut, naming the cut) so
# that every condition type fits at once.
CONDITION_MESSAGE_MAX = 8192
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# A Kubernetes label value (a LocalQueue name, a WorkloadPriorityClass name) and a DNS-1123 subdomain (PriorityClass).
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Uri = Annotated[str, Field(min_length=1, max_length=URI_MAX)]
Quantity = Annotated[int | str, Field(json_schema_extra={"pattern": QUANTITY_PATTERN})]


class ApiModel(BaseModel):
    """Base of every API block: camelCase JSON keys, snake_case attributes, docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def section(description: str | None = None) -> Any:
    """A nested object field that is always present: the CRD defaults it to ``{}`` so its own defaults apply."""
    return Field(default_factory=dict, json_schema_extra={"default": {}}, description=description)


# ---------------------------------------------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------------------------------------------


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    base: Uri
    """Hugging Face model folder (config.json, *.safetensors, tokenizer files): an s3://bucket/prefix/ or an
    absolute path visible to the trainer pods."""

    parameters_millions: int | None = Field(default=None, ge=1, le=10_000_000)
    """Model size in millions of parameters, used to scale the automatic learning rate. Optional: when omitted the
    operator reads a size token such as '1b', '0.5B' or '350m' from the last segment of 'base', and falls back to
    the reference size of the defaults table (recorded in status.resolved.notes)."""

    attention_implementation: AttentionImplementation = "sdpa"
    """The attention kernel: `sdpa` (PyTorch's scaled_dot_product_attention, on any device), `flash_attention_2`
    (the flash-attn package in the trainer image, CUDA GPUs only: variable-length kernels, so per-document attention
    costs no mask) or `eager` (the reference implementation)."""


class Source(ApiModel):
    """One data source with its weight inside its group (domain or general)."""

    uri: Uri
    """s3://bucket/prefix or an absolute path: a .jsonl file ({"text": ...} or chat {"messages": [...]}), a .txt
    file, or a folder/prefix of such files (read in sorted order)."""

    weight: int = Field(default=1, ge=1, le=1_000_000)
    """Relative share of this source inside its group, in tokens (weights are normalised within the group)."""


class LoraSpec(ApiModel):
    """LoRA adapter settings; used only with technique 'lora' (defaults apply when the block is omitted)."""

    rank: int = Field(default=16, ge=1, le=1024)
    """Adapter rank r."""

    alpha: int = Field(default=32, ge=1, le=4096)
    """Scaling numerator: adapter updates are scaled by alpha/rank."""

    dropout_percent: int = Field(default=5, ge=0, le=90)
    """Dropout on the adapter input, in percent."""

    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        max_length=64,
        json_schema_extra={"default": list(DEFAULT_LORA_TARGETS)},
    )
    """Names (suffixes) of the linear modules that get adapters."""


class DataSpec(ApiModel):
    """Training data and the token mix between domain and general data."""

    domain_percent: int = Field(default=75, ge=1, le=100)
    """Share of the training tokens drawn from the domain sources, in percent (of the tokens that carry loss under
    mixBy lossTokens, the default for sft and lora); the rest comes from the general sources (replay that protects
    general abilities). 100 means domain data only."""

    domain: list[Source] = Field(min_length=1, max_length=256)
    """Domain sources: the user's data."""

    general: list[Source] = Field(default_factory=list, max_length=256)
    """General (curated) sources replayed to limit forgetting; required when domainPercent < 100."""

    seq_length: int = Field(default=4096, ge=128, le=131_072)
    """Tokens per packed training sequence."""

    max_repetition: int = Field(default=4, ge=1, le=1000)
    """How many passes over a source are allowed to fill its share (1 = never repeat)."""

    max_bad_lines: int = Field(default=100, ge=0, le=1_000_000)
    """Malformed records skipped per source before the run fails naming the file and line."""

    cross_document_attention: bool = False
    """Let tokens attend to the earlier documents packed into the same sequence (plain causal attention over the
    sequence). By default attention stays inside each document: position ids restart at every document, as the
    model saw in pretraining, and no document is conditioned on an unrelated one (which sft needs: a chat must not
    see the one before it)."""

    mix_by: MixBy | None = None
    """What domainPercent counts: `tokens` (every input token) or `lossTokens` (only the tokens that carry loss, so
    the shares of the gradient: with sft and lora a chat's prompt tokens carry none, and mixing chats with plain text
    by input tokens gives the text a larger share of the gradient than domainPercent says). The same for cpt, whose
    every token carries loss. Omitted: `lossTokens` for sft and lora, `tokens` for cpt (status.resolved.notes says
    which). Either way status.latest.realisedDomainGradientPercent reports the realised share."""


class EvalSpec(ApiModel):
    """Held-out evaluation sets, fixed for the whole run; forgetting is measured on the general set."""

    every_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    """Evaluate every this many optimizer steps (the base model is evaluated once before step 1). Omitted: maxSteps /
    20, between 1 and 100, so that a run has at least 20 evaluations (up to 2,000 steps) and the guard's forgetting
    rule, which needs a few of them past its grace period, can act within the first third of any run."""

    domain: list[Source] = Field(default_factory=list, max_length=64)
    """Held-out domain sources. When empty, holdOutPerMille of the documents of data.domain are held out, chosen by
    a hash of each document, and never trained on (recorded in status.resolved.notes)."""

    general: list[Source] = Field(default_factory=list, max_length=64)
    """Held-out general sources. When empty, holdOutPerMille of the documents of data.general are held out, chosen
    by a hash of each document, and never trained on; required when data.general and eval.unseenGeneral are both
    empty (forgetting cannot be measured without general data)."""

    unseen_general: list[Source] = Field(default_factory=list, max_length=16)
    """General text from neither training set, never replayed (its uris may not appear in data.domain or
    data.general). Forgetting is measured on it too, and the worse of its forgetting and the general set's is what
    forgetting.budgetPercent, the guard and checkpoint selection judge. Replay lowers the loss on its own
    distribution by construction, so forgetting measured only on held-out replay data reads optimistic; give one
    (docs/user-guide.md)."""

    hold_out_per_mille: int = Field(default=20, ge=1, le=250)
    """Documents per thousand of the training sources held out for evaluation when eval.domain or eval.general is
    empty (for that group only). The split depends on each document's content alone, so it is the same on every
    rank and restart and never takes the first documents the run trains on."""

    max_tokens: int = Field(default=262_144, ge=128, le=1_073_741_824)
    """Tokens evaluated per group (domain, general), split by source weight."""

    kl_top_k: int = Field(default=16, ge=0, le=1024)
    """KL(base || model) on the general held-out tokens, measured at every evaluation from the base model's top-k
    log-probabilities per token, cached at the baseline evaluation (the rest of the base's probability mass counts
    as one bucket, so the value is a lower bound of the full KL). A forgetting measure that does not depend on the
    general loss alone; 0 turns it off."""


DEFAULT_PROBE_MULTIPLIER_PERCENTS = (25, 50, 100, 200, 400)


class LearningRateProbeSpec(ApiModel):
    """The learning-rate probe: before training, the trainer runs a few short runs at multiples of the (resolved)
    learning rate on the real data mix, measures forgetting, projects it to the whole run, and trains at the highest
    multiple projected within forgetting.budgetPercent (status.lrProbe says which and why)."""

    multiplier_percents: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
        default_factory=lambda: list(DEFAULT_PROBE_MULTIPLIER_PERCENTS),
        min_length=1,
        max_length=8,
        json_schema_extra={"default": list(DEFAULT_PROBE_MULTIPLIER_PERCENTS), "x-kubernetes-list-type": "set"},
    )
    """Multiples of the learning rate to probe, in percent (100 = the resolved rate itself); distinct. The peak rate
    times the largest multiple must stay at or below 1."""

    steps: int = Field(default=20, ge=2, le=100_000)
    """Optimizer steps of each probe run (at most training.maxSteps). The probe costs len(multiplierPercents) x steps
    extra steps plus their evaluations."""

    evaluations: int = Field(default=4, ge=1, le=100)
    """Held-out evaluations per probe run, evenly spaced, the last at its final step (at most steps)."""

    eval_max_tokens: int = Field(default=32_768, ge=128, le=1_073_741_824)
    """Tokens of each held-out group (domain, general) per probe evaluation, at most eval.maxTokens: the first ones
    of the evaluation sets. Fewer than the run's evaluations, to keep the probe cheap."""


class TrainingSpec(ApiModel):
    """Optimisation settings. 'auto' values are resolved by the operator into status.resolved."""

    learning_rate: str = Field(default="auto", max_length=32, pattern=LEARNING_RATE_PATTERN)
    """Peak learning rate as a decimal string ("2e-5"), or "auto" for the calibrated default of the technique,
    scaled by model size and global batch (see status.resolved.learningRateWhy). Must lie in (0, 0.01]."""

    min_learning_rate_percent: int = Field(default=0, ge=0, le=100)
    """Floor the cosine and wsd schedules decay to, in percent of the peak learning rate."""

    schedule: Schedule = "cosine"
    """Learning-rate schedule after linear warmup: cosine, constant, or wsd (warmup-stable-decay)."""

    warmup_percent: int = Field(default=3, ge=0, le=50)
    """Linear warmup, in percent of maxSteps."""

    decay_percent: int = Field(default=20, ge=1, le=100)
    """wsd only: share of maxSteps spent in the final decay, in percent."""

    global_batch_tokens: int | None = Field(default=None, ge=128, le=1_073_741_824)
    """Target tokens per optimizer step over all ranks. Omitted: the technique's default. The operator picks
    gradientAccumulationSteps = round(globalBatchTokens / (seqLength * microBatchSize * worldSize)), at least 1;
    the effective value is recorded in status.resolved."""

    micro_batch_size: int = Field(default=4, ge=1, le=1024)
    """Sequences per process per forward pass."""

    max_steps: int = Field(default=1000, ge=1, le=10_000_000)
    """Optimizer steps of the run."""

    precision: Precision = "bf16"
    """Training precision: bf16 (mixed, fp32 master weights) or fp32."""

    zero_stage: int | None = Field(default=None, ge=0, le=3)
    """DeepSpeed ZeRO stage 0-3. Omitted: 0 when the run has one process (there is nothing to partition, and ZeRO-1/2
    would only add bucketed gradient copies), 2 with more (optimizer state and gradients partitioned)."""

    seed: int = Field(default=1234, ge=0, le=4_294_967_295)
    """Seed of initialisation noise, dropout and data order."""

    gradient_clipping: str = Field(default="1.0", max_length=32, pattern=DECIMAL_PATTERN)
    """Global gradient-norm clip as a decimal string; "0" turns clipping off. At most 100."""

    weight_decay: str = Field(default="0.0", max_length=32, pattern=DECIMAL_PATTERN)
    """AdamW decoupled weight decay as a decimal string, at most 1."""

    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% more compute)."""

    compile: bool | None = None
    """torch.compile the model. Omitted: on when resources.gpusPerNode > 0, off on CPU. The first step compiles; the
    trainer reports it as the compile phase (event and metric), not counted in tokens per second."""

    loss_chunk_tokens: int | None = Field(default=None, ge=0, le=1_048_576)
    """Positions per chunk of the chunked linear cross-entropy, which never materialises the fp32 logits of a whole
    micro-batch (0 = full logits). Omitted: 1024 when resources.gpusPerNode > 0 and zeroStage < 3, else 0. Must be 0
    with zeroStage 3."""

    learning_rate_probe: LearningRateProbeSpec | None = None
    """Omitted: off. Set (even to {}): probe multiples of the learning rate before training and train at the highest
    one whose forgetting, projected to the whole run, stays within forgetting.budgetPercent; the schedule's floor
    scales with it. status.resolved keeps the configured rate; the rate trained at is status.lrProbe.learningRate."""


class ForgettingSpec(ApiModel):
    """The forgetting budget: how much general ability the run may lose."""

    budget_percent: int = Field(default=2, ge=0, le=100)
    """Largest allowed relative rise of the general held-out loss over the base model, in percent."""

    action: ForgettingAction = "stop"
    """What the trainer does when the budget is exceeded: stop (save a checkpoint and end the run early), warn
    (condition only) or rebalance (raise the general share for the rest of the run)."""

    grace_percent: int = Field(default=10, ge=0, le=100)
    """Grace period of the guard, in percent of training.maxSteps: the loss-divergence, grad-norm-spikes,
    forgetting-budget and no-domain-progress rules do not act at or before step ceil(maxSteps * gracePercent / 100),
    because general loss often rises early in a run and then recovers (the stability gap). A NaN or infinite loss
    always stops the run at once."""

    grace_evals: int = Field(default=2, ge=0, le=1000)
    """The forgetting-budget and no-domain-progress rules also wait for this many evaluations after the baseline
    (on top of gracePercent)."""

    slope_window_evals: int = Field(default=3, ge=2, le=1000)
    """forgetting-budget rule: over the budget, the rule acts when forgetting is still rising or falls too slowly to
    be back within the budget by the end of the run. The trend is the least-squares slope of forgetting against the
    cumulative learning rate, fitted over the last this many evaluations."""

    lr_too_high_factor: int = Field(default=3, ge=1, le=1000)
    """forgetting-budget rule: the reason is LearningRateTooHigh when the forgetting projected to the end of the run
    exceeds this many times budgetPercent, else ForgettingBudgetExceeded."""

    no_progress_evals: int = Field(default=5, ge=1, le=1000)
    """no-domain-progress rule (NoDomainProgress): acts when the domain gain did not improve on its best earlier
    value (by at least 0.1 points) over the last this many evaluations."""

    divergence_factor: int = Field(default=3, ge=2, le=1000)
    """loss-divergence rule (LossDiverged): acts when a step's training loss exceeds this many times the best value
    of its moving average."""

    grad_spike_factor: int = Field(default=10, ge=2, le=1_000_000)
    """grad-norm-spikes rule (GradNormSpikes): a step's gradient norm is a spike when it exceeds this many times the
    running median of the recent norms."""

    grad_spike_steps: int = Field(default=5, ge=1, le=100_000)
    """grad-norm-spikes rule: acts after this many consecutive spike steps."""


class CandidatesSpec(ApiModel):
    """Which weight averages and interpolations the trainer builds from its checkpoints at the end of the run."""

    average_last: int = Field(default=3, ge=0, le=100)
    """Uniform weight average of the last this many complete checkpoints, as one candidate; needs at least 2 saved
    checkpoints. 0 or 1 turns it off."""

    interpolation_alpha_percents: list[Annotated[int, Field(ge=1, le=99)]] = Field(
        default_factory=lambda: [25, 50, 75],
        max_length=16,
        json_schema_extra={"default": [25, 50, 75], "x-kubernetes-list-type": "set"},
    )
    """WiSE-FT interpolations of the last checkpoint with the base model, one candidate per value: weights
    (1 - alpha) * base + alpha * last, with alpha = value / 100. Values must be distinct; empty turns them off."""


class CheckpointSpec(ApiModel):
    """Checkpoint cadence, destination and selection."""

    every_steps: int = Field(default=200, ge=1, le=10_000_000)
    """Save a checkpoint every this many optimizer steps (and at the end of the run)."""

    output: Uri
    """Durable destination: s3://bucket/prefix/ or an absolute path; each checkpoint is <output>/step-NNNNNNNN/."""

    selection: SelectionPolicy = "best-within-budget"
    """How status.selected is chosen among the reported checkpoints: best-within-budget (largest domain gain with
    forgetting within the budget; if none qualifies, the least forgetting), pareto (records the non-dominated set
    of domain gain vs forgetting and selects from it as best-within-budget does), or last. May change at any
    time (the operator alone applies it)."""

    budget_confidence_percent: int = Field(default=80, ge=50, le=99)
    """How sure selection must be that a checkpoint is within the forgetting budget, in percent: it counts as within
    when forgetting + z x its standard error <= budget (z of this one-sided confidence: 0.84 at 80, 1.64 at 95; 50
    compares the measured forgetting alone; 80 is calibrated by the forgetting sweep, docs/trainer.md). The
    standard error comes from the trainer (paired per-sequence differences to the base model); when none is reported
    the measured value is compared. When nothing qualifies with this confidence, selection falls back to the measured
    value and says so. May change at any time, like selection. The guard's forgetting rule (spec.forgetting) uses
    the level accepted at the start of the run the other way round: it acts only when forgetting - z x its standard
    error is over the budget, so that the noise of a small held-out set does not stop a run."""

    keep: int = Field(default=3, ge=1, le=10_000)
    """Complete checkpoints kept on the trainer's local disk (newest first)."""

    keep_resumable: int = Field(default=2, ge=1, le=10_000)
    """The newest complete checkpoints that keep their training state (optimizer and RNG states) in the output, so
    that the run can resume from them."""

    output_retention: OutputRetention = "dropOptimizerState"
    """What the output keeps. dropOptimizerState: after each save the trainer drops the training state of the
    checkpoints beyond keepResumable that are neither status.selected nor on the Pareto set (their hf/ export, the
    weights, stays, so selection can still pick them); keepAll: every checkpoint whole (hundreds of GB per
    checkpoint at 7B and up)."""

    candidates: CandidatesSpec = section()
    """End-of-run candidates: averages and interpolations built from the saved checkpoints when the run ends (also
    after a guard stop), evaluated on the held-out sets, written to <output>/candidates/<name>/ and reported in
    status.checkpoints (kind average or interpolation). Selection weighs them like checkpoints, except 'last', which
    never picks them."""


class ResourceRequirements(ApiModel):
    """Compute resources of each trainer container (the Kubernetes ResourceRequirements shape)."""

    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources, e.g. {cpu: "16", memory: 200Gi}. GPUs come from gpusPerNode, not from here."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Requested resources, e.g. {cpu: "8", memory: 100Gi}."""


class Toleration(ApiModel):
    """A Kubernetes toleration for the trainer pods."""

    key: str | None = Field(default=None, max_length=317)
    """Taint key to tolerate; empty with operator Exists tolerates every taint."""

    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists (any value) or Equal (value must match)."""

    value: str | None = Field(default=None, max_length=63)
    """Taint value for operator Equal; must be empty for Exists."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty tolerates every effect."""

    toleration_seconds: int | None = Field(default=None, ge=0, le=31_536_000)
    """For NoExecute: how long the pod stays bound after the taint appears."""


LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY_PATTERN)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
MountPath = Annotated[str, Field(min_length=2, max_length=1024, pattern=r"^/[^\s:]*$")]


class NodeSelectorRequirement(ApiModel):
    """A node label requirement (the Kubernetes NodeSelectorRequirement shape)."""

    key: LabelKey
    """Node label key."""

    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """In/NotIn: the label's value is (not) one of values; Exists/DoesNotExist: values empty; Gt/Lt: one integer."""

    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)
    """Label values the operator compares with."""


class NodeSelectorTerm(ApiModel):
    """Requirements a node must all meet (ANDed)."""

    match_expressions: list[NodeSelectorRequirement] = Field(min_length=1, max_length=32)
    """Node label requirements."""


class NodeSelector(ApiModel):
    """Terms of which a node must meet one (ORed)."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=16)
    """The terms."""


class PreferredSchedulingTerm(ApiModel):
    """A weighted preference for nodes that meet a term."""

    weight: int = Field(ge=1, le=100)
    """Weight added to a node's score when it meets the term."""

    preference: NodeSelectorTerm
    """The term."""


class NodeAffinity(ApiModel):
    """Which nodes the trainer pods may or prefer to run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pods must run on."""

    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=16
    )
    """Nodes the pods prefer."""


class LabelSelectorRequirement(ApiModel):
    """A pod label requirement."""

    key: LabelKey
    """Pod label key."""

    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In/NotIn need values; Exists/DoesNotExist take none."""

    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)
    """Label values."""


class LabelSelector(ApiModel):
    """Pods selected by labels (both parts ANDed)."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    """Labels the pods must carry with these values."""

    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)
    """Label requirements."""


class PodAffinityTerm(ApiModel):
    """Pods (selected by labels) near which a trainer pod must or must not run, within one topology domain."""

    label_selector: LabelSelector
    """The other pods."""

    topology_key: LabelKey
    """Node label that defines the domain: kubernetes.io/hostname (same node), topology.kubernetes.io/zone, or a
    rack or NVLink-domain label of your nodes."""

    namespaces: list[Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]] = Field(
        default_factory=list, max_length=64
    )
    """Namespaces of the other pods; empty: the ForgeJob's namespace."""


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100)
    """Weight added to a node's score when it meets the term."""

    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(ApiModel):
    """Pod affinity or anti-affinity rules."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=16
    )
    """Terms every pod must meet."""

    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=16
    )
    """Preferred terms."""


class Affinity(ApiModel):
    """Node and pod affinity of the trainer pods (the Kubernetes Affinity shape), e.g. all pods of a run in one
    rack or zone (podAffinity on the label forge.dev/forgejob), or one trainer pod per node (podAntiAffinity)."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""

    pod_affinity: PodAffinity | None = None
    """Run near pods selected by labels."""

    pod_anti_affinity: PodAffinity | None = None
    """Run away from pods selected by labels."""


class PersistentVolumeClaimSource(ApiModel):
    """A PersistentVolumeClaim in the ForgeJob's namespace."""

    claim_name: ObjectName
    """Name of the claim."""

    read_only: bool = False
    """Mount it read-only (a shared dataset)."""


class ConfigMapVolumeSource(ApiModel):
    """A ConfigMap's keys as files."""

    name: ObjectName
    """Name of the ConfigMap."""

    optional: bool | None = None
    """Whether the pod may start without it."""


class SecretVolumeSource(ApiModel):
    """A Secret's keys as files."""

    secret_name: ObjectName
    """Name of the Secret."""

    optional: bool | None = None
    """Whether the pod may start without it."""


class EmptyDirVolumeSource(ApiModel):
    """A scratch folder that lives as long as the pod."""

    medium: Literal["Memory"] | None = None
    """Memory for a tmpfs; omitted: the node's disk."""

    size_limit: Quantity | None = None
    """Its size limit; omitted: none."""


class Volume(ApiModel):
    """An extra volume of the trainer pods: exactly one of persistentVolumeClaim, configMap, secret, emptyDir."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Volume name (what volumeMounts refer to); forge-config, scratch, tmp and dshm are Forge's."""

    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    """A PersistentVolumeClaim: a dataset or a model/cache volume shared by the pods (ReadOnlyMany or ReadWriteMany
    when nodes > 1)."""

    config_map: ConfigMapVolumeSource | None = None
    """A ConfigMap."""

    secret: SecretVolumeSource | None = None
    """A Secret."""

    empty_dir: EmptyDirVolumeSource | None = None
    """An emptyDir."""


class VolumeMount(ApiModel):
    """Where a volume appears in the trainer container."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Name of a volume in spec.resources.volumes."""

    mount_path: MountPath
    """Absolute path; not /, /tmp, /tmp/forge, /etc/forge or /dev/shm (Forge's own mounts) nor a parent of one."""

    sub_path: str | None = Field(default=None, max_length=1024, pattern=r"^[^/\s][^\s]*$")
    """A relative path inside the volume to mount instead of its root."""

    read_only: bool = False
    """Mount read-only."""


class ResourcesSpec(ApiModel):
    """Where and on what the trainer runs."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Pods (nodes) of the PyTorchJob: one Master and nodes-1 Workers."""

    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """GPUs (gpuResource, default nvidia.com/gpu) per pod, and trainer processes per pod; 0 runs one CPU process per
    pod."""

    image: str | None = Field(default=None, min_length=1, max_length=1024)
    """Trainer image; omitted: the operator's default (FORGE_TRAINER_IMAGE)."""

    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Image pull policy of the trainer container; omitted: the Kubernetes default."""

    resources: ResourceRequirements = section()
    """CPU, memory and other requests/limits of each trainer container."""

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    """Node labels the trainer pods must match."""

    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Tolerations of the trainer pods."""

    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-A-Za-z0-9_.]+$",
    )
    """Extended resource that gpusPerNode requests: nvidia.com/gpu, amd.com/gpu, or a MIG profile such as
    nvidia.com/mig-3g.40gb."""

    image_pull_secrets: list[Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]] = (
        Field(default_factory=list, max_length=16)
    )
    """Secrets (kubernetes.io/dockerconfigjson, in the ForgeJob's namespace) for pulling a private trainer image: set
    on the trainer pods and on their ServiceAccount."""

    scratch_size_limit: Quantity | None = None
    """sizeLimit of the scratch emptyDir (/tmp/forge: local checkpoints, caches); omitted: no limit."""

    shm_size_limit: Quantity | None = None
    """sizeLimit of the in-memory /dev/shm emptyDir (pods with GPUs); omitted: no limit (it counts against the
    container's memory)."""

    affinity: Affinity | None = None
    """Node and pod affinity of the trainer pods."""

    volumes: list[Volume] = Field(default_factory=list, max_length=32)
    """Extra volumes of the trainer pods (a PersistentVolumeClaim holding a dataset or a cache, a ConfigMap, a
    Secret, an emptyDir); each is mounted by a volumeMounts entry."""

    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=32)
    """Where the extra volumes appear in the trainer container."""

    pod_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict)
    """Extra labels of the trainer pods, for keys the operator allows (FORGE_POD_METADATA_ALLOWED_KEYS; never Forge's,
    Kubeflow's, Kueue's or a gang scheduler's own keys)."""

    pod_annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict)
    """Extra annotations of the trainer pods, for keys the operator allows (as podLabels)."""


class KeyRef(ApiModel):
    """A key of a Secret or ConfigMap in the ForgeJob's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret or ConfigMap."""

    key: str = Field(min_length=1, max_length=253)
    """Key inside it."""

    optional: bool | None = None
    """Whether the pod may start when the key is missing."""


class FieldRef(ApiModel):
    """A field of the pod, e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, max_length=256)
    """Path of the field in the pod."""

    api_version: str | None = Field(default=None, max_length=64)
    """Version of the schema the path is written in (default v1)."""


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from (exactly one of the fields)."""

    secret_key_ref: KeyRef | None = None
    """A key of a Secret (e.g. S3 credentials)."""

    config_map_key_ref: KeyRef | None = None
    """A key of a ConfigMap."""

    field_ref: FieldRef | None = None
    """A field of the pod."""


class EnvFromRef(ApiModel):
    """A Secret or ConfigMap in the ForgeJob's namespace whose keys all become environment variables."""

    name: ObjectName
    """Its name."""

    optional: bool | None = None
    """Whether the pod may start without it."""


class EnvFromSource(ApiModel):
    """Every key of a Secret or a ConfigMap as environment variables (exactly one of secretRef, configMapRef)."""

    prefix: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Prepended to each key."""

    secret_ref: EnvFromRef | None = None
    """A Secret (e.g. S3 credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""

    config_map_ref: EnvFromRef | None = None
    """A ConfigMap."""


class EnvVar(ApiModel):
    """An environment variable of the trainer container (e.g. AWS_ENDPOINT_URL, credentials from a Secret)."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Variable name; the names the training operator injects (MASTER_ADDR, RANK, ...) are reserved."""

    value: str | None = Field(default=None, max_length=32_768)
    """Literal value."""

    value_from: EnvVarSource | None = None
    """Value from a Secret, a ConfigMap or the pod; exclusive with value."""


class GangSpec(ApiModel):
    """All-or-nothing scheduling of the run's pods by Volcano or scheduler-plugins (coscheduling): the Kubeflow
    training-operator, started with --gang-scheduler-name, turns the PyTorchJob's runPolicy.schedulingPolicy into a
    PodGroup, and the gang scheduler binds no pod until minAvailable of them fit."""

    min_available: int | None = Field(default=None, ge=1, le=1024)
    """Pods that must be placed together; omitted: every pod of the run (spec.resources.nodes). At most nodes."""

    queue: str | None = Field(default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Volcano Queue the PodGroup waits in (Volcano only; omitted: Volcano's default queue)."""

    priority_class: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """PriorityClass of the PodGroup (its order in the gang scheduler's queue); omitted:
    spec.scheduling.priorityClassName."""

    schedule_timeout_seconds: int | None = Field(default=None, ge=1, le=604_800)
    """How long the gang may wait to be placed whole before the scheduler gives up on this attempt
    (scheduler-plugins' PodGroup scheduleTimeoutSeconds; Volcano ignores it)."""


class SchedulingSpec(ApiModel):
    """How the run shares the cluster: the Kueue queue it waits in, its priority, its scheduler and gang."""

    queue_name: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    """Kueue LocalQueue (in the ForgeJob's namespace) the run waits in: the PyTorchJob gets the label
    kueue.x-k8s.io/queue-name, is created suspended, and Kueue un-suspends it when it admits it (and suspends it again
    when it pre-empts it). The ForgeJob's state is Queued while Kueue holds it. Omitted: no queue."""

    workload_priority_class: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    """Kueue WorkloadPriorityClass of the run (label kueue.x-k8s.io/priority-class): its priority in the queue and
    for pre-emption, without changing the pods' priority. Needs queueName."""

    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Kubernetes PriorityClass of the trainer pods (priorityClassName); Kueue also uses it as the run's priority
    when no workloadPriorityClass is set."""

    scheduler_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Scheduler of the trainer pods (schedulerName): volcano, or the name of the scheduler-plugins scheduler (often
    scheduler-plugins-scheduler). With gang it must be the scheduler the training-operator's --gang-scheduler-name
    names (omitted: the training operator sets it)."""

    gang: GangSpec | None = None
    """Gang scheduling (Volcano or scheduler-plugins), rendered as the PyTorchJob's runPolicy.schedulingPolicy.
    Omitted: none. Set (even to {}): every pod is placed together or none is."""


class RunPolicySpec(ApiModel):
    """How the PyTorchJob retries and is cleaned up (Kubeflow runPolicy)."""

    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Restarts allowed before the PyTorchJob is marked Failed."""

    restart_policy: RestartPolicy = "ExitCode"
    """Replica restart policy. ExitCode (default): the trainer's exit codes 1-127 are permanent failures that no
    restart can fix (bad config, bad data: the job fails at once, with the cause in the Failed condition), 128 and
    above are retried (storage unavailable 200, a lost peer 201, killed by a signal 128+N). OnFailure restarts on
    any failure (a permanent error is retried up to backoffLimit); Never restarts nothing."""

    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=31_536_000)
    """Delete the finished PyTorchJob (and its pods) after this many seconds; omitted: keep it. The ForgeJob keeps
    its status and is never re-run once it finished."""

    active_deadline_seconds: int | None = Field(default=None, ge=1, le=31_536_000)
    """Fail the PyTorchJob when it runs longer than this; omitted: no deadline."""


class MonitoringSpec(ApiModel):
    """Liveness of the run: every trainer rank times its own steps (the hang watchdog), the operator watches the
    reported steps (stalls)."""

    hang_multiple: int = Field(default=10, ge=2, le=1000)
    """A training step that runs longer than this multiple of the recent median step (and longer than
    hangFloorSeconds) is hung: the rank writes every thread's stack to its log, reports the hang in
    status.trainerError and exits with the retryable code 202, so the job restarts from its latest complete
    checkpoint instead of waiting for the distributed timeout (30 minutes with NCCL)."""

    hang_floor_seconds: int = Field(default=300, ge=10, le=86_400)
    """A step is never hung before this many seconds (the first steps have no median yet; a collective after a slow
    storage read or a recompilation may take a while)."""

    stall_minutes: int | None = Field(default=None, ge=1, le=10_080)
    """The run is stalled when the trainer reports no new step for this many minutes while it trains (the operator
    checks every FORGE_LIVENESS_CHECK_SECONDS). Omitted: derived from the run's own pace, 3 x the expected gap
    between two progress reports (the larger of the report interval and logEverySteps x the recent step time the
    trainer reports), never below 10 minutes (the operator's FORGE_STALL_FLOOR_SECONDS)."""

    startup_minutes: int = Field(default=60, ge=1, le=10_080)
    """The stall limit of the phases other than training: setup (model download, tokenisation, the baseline),
    compile, evaluate (evaluation and checkpoint save) and candidates. Raise it for large models on slow storage."""

    on_stall: StallAction = "restart"
    """What a stall does. restart: the child job's pods are deleted, the training operator re-creates them and the
    run resumes from its latest complete checkpoint (at most maxStallRestarts times, counted in
    status.stallRestarts; then as fail). fail: the ForgeJob fails with reason Stalled and its PyTorchJob is deleted.
    warn: only the Progressing=False condition, an Event and the forge_forgejob_stalled metric."""

    max_stall_restarts: int = Field(default=2, ge=0, le=100)
    """Restarts onStall restart may make over the whole run; a stall after the last one fails the ForgeJob."""

    straggler_percent: int = Field(default=130, ge=110, le=1000)
    """A rank whose own compute time per step (the forward passes, before the gradient all-reduce where every rank
    waits for the slowest) stays above this percentage of the other ranks' median for slowReadBacks read-backs in a
    row is a straggler: condition ThroughputDegraded=True, reason Straggler, naming its rank, pod and node. 130: a
    healthy rank's median step varies by a few percent; a throttled GPU, a noisy neighbour or a slow host shows as
    tens of percent. Reported only: Forge changes nothing."""

    throughput_drop_percent: int = Field(default=50, ge=1, le=99)
    """The job's tokens/s below this percentage of its own running median (over the last 20 read-backs, evaluations,
    checkpoints and the compile step left out) for slowReadBacks read-backs in a row is a throughput drop:
    ThroughputDegraded=True, reason ThroughputDrop. 50: halving is well beyond the noise of a healthy run."""

    slow_read_backs: int = Field(default=5, ge=1, le=1000)
    """How many read-backs in a row (one every spec.training.logEverySteps steps) a straggler or a drop must hold
    before it is reported, and stay away before the condition clears (reason Recovered). 5: a single slow stretch
    (a checkpoint upload, a garbage collection) is not reported."""


class ForgeJobSpec(ApiModel):
    """What to fine-tune, on which data, how, and within which forgetting budget."""

    model: ModelSpec
    """The base model."""

    technique: Technique
    """cpt (continued pretraining: loss on every token), sft (supervised fine-tuning: loss on assistant tokens) or
    lora (sft training low-rank adapters only). Each has calibrated defaults (docs/user-guide.md)."""

    lora: LoraSpec | None = None
    """LoRA settings; only with technique lora (omitted: the defaults of each field)."""

    data: DataSpec
    """Training data and mixing."""

    eval: EvalSpec = section()
    """Held-out evaluation sets and cadence."""

    training: TrainingSpec = section()
    """Optimisation settings."""

    forgetting: ForgettingSpec = section()
    """Forgetting budget and what happens when it is exceeded."""

    checkpoints: CheckpointSpec
    """Checkpoint cadence, destination and selection policy."""

    resources: ResourcesSpec = section()
    """Nodes, GPUs, image, container resources and scheduling."""

    env: list[EnvVar] = Field(default_factory=list, max_length=128)
    """Extra environment variables of the trainer container."""

    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16)
    """Secrets and ConfigMaps whose keys all become environment variables of the trainer container (env wins over
    them for the same name)."""

    run_policy: RunPolicySpec = section()
    """Retries, restart policy, deadline and clean-up of the PyTorchJob."""

    scheduling: SchedulingSpec = section()
    """Queue (Kueue) and priority of the run on a shared cluster."""

    monitoring: MonitoringSpec = section()
    """When a run counts as hung or stalled, and what a stall does."""

    backend: BackendName | None = None
    """Which Kubeflow job runs the trainer: pytorchjob (the training-operator's PyTorchJob, kubeflow.org/v1) or
    trainjob (Kubeflow Trainer v2's TrainJob, trainer.kubeflow.org/v1alpha1). Omitted: the operator's default
    (FORGE_DEFAULT_BACKEND, pytorchjob). Fixed once the run started (docs/user-guide.md, "Choosing a backend")."""

    training_runtime: str | None = Field(default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """backend trainjob only: the ClusterTrainingRuntime the TrainJob references (a torch runtime, e.g.
    torch-distributed). Omitted: the operator's default (FORGE_TRAINJOB_RUNTIME, torch-distributed)."""

    suspend: bool = False
    """Pause (true) or resume (false) the run. With checkpoints.selection, the only fields that may change once the
    PyTorchJob exists. The operator writes the PyTorchJob's runPolicy.suspend only when this field changes; with
    scheduling.queueName it never un-suspends the PyTorchJob itself (Kueue does, when it admits the run)."""


# ---------------------------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------------------------


class StatusModel(ApiModel):
    """Base of status blocks: unknown keys are ignored (the API server prunes them anyway)."""

    model_config = ConfigDict(extra="ignore")


class Condition(StatusModel):
    """One aspect of the ForgeJob's state (Kubernetes API conventions)."""

    type: str = Field(min_length=1, max_length=316)
    """Accepted, Queued, Created, Running, Restarting, Suspended, Succeeded, Failed, ForgettingWithinBudget,
    EarlyStopped, GuardWarning, Rebalanced."""

    status: ConditionStatus
    """True, False or Unknown."""

    reason: str = Field(min_length=1, max_length=1024)
    """A CamelCase word for programs (e.g. InvalidSpec, PyTorchJobRunning)."""

    message: str = Field(default="", max_length=CONDITION_MESSAGE_MAX)
    """A sentence for people."""

    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    """When the status last changed (RFC 3339)."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this condition was computed from."""


class Resolved(StatusModel):
    """What 'auto' and the derived training values became, and why."""

    learning_rate: str = Field(max_length=64)
    """Peak learning rate from spec.training.learningRate, as a decimal string. With
    spec.training.learningRateProbe the trainer trains at a multiple of it: see status.lrProbe."""

    learning_rate_source: Literal["auto", "spec"]
    """auto: from the defaults table; spec: as written in spec.training.learningRate."""

    learning_rate_why: str = Field(max_length=STATUS_TEXT_MAX)
    """How the learning rate was obtained (table value and scale factors)."""

    min_learning_rate: str = Field(max_length=64)
    """Floor of the schedule, as a decimal string."""

    model_parameters_millions: int | None = None
    """Model size used for scaling, when known."""

    world_size: int
    """Trainer processes: nodes * max(gpusPerNode, 1)."""

    micro_batch_size: int
    """Sequences per process per forward pass."""

    gradient_accumulation_steps: int
    """Micro-batches accumulated per optimizer step."""

    global_batch_tokens: int
    """Effective tokens per optimizer step: seqLength * microBatchSize * gradientAccumulationSteps * worldSize."""

    global_batch_sequences: int
    """Effective sequences per optimizer step."""

    warmup_steps: int
    """Linear warmup steps."""

    total_tokens: int
    """Training tokens of the whole run: globalBatchTokens * maxSteps."""

    forgetting_budget_percent: int | None = None
    """The forgetting budget the run was accepted with (used by the trainer's guard and by selection)."""

    notes: list[Annotated[str, Field(max_length=STATUS_TEXT_MAX)]] = Field(default_factory=list, max_length=16)
    """Why each derived value is what it is."""


class Baseline(StatusModel):
    """The base model's held-out losses, measured before step 1 (written by the trainer)."""

    domain_loss: float | None = None
    """Mean loss on the domain held-out set."""

    general_loss: float | None = None
    """Mean loss on the general held-out set."""

    unseen_loss: float | None = Field(default=None, ge=0)
    """Mean loss on the never-replayed general sets (spec.eval.unseenGeneral)."""


class Progress(StatusModel):
    """How far the run is (written by the trainer)."""

    step: int | None = Field(default=None, ge=0)
    """Optimizer steps done."""

    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps of the run."""

    tokens: int | None = Field(default=None, ge=0)
    """Training tokens consumed."""

    percent: float | None = None
    """step / totalSteps, in percent."""

    eta_seconds: float | None = None
    """Estimated seconds to the end of the run."""

    phase: TrainerPhase | None = None
    """What the trainer is doing: setup (model, data, baseline), compile (the first compiled step), train,
    evaluate (held-out evaluation and checkpoint save) or candidates (end-of-run candidates)."""

    time: str | None = Field(default=None, max_length=64, json_schema_extra={"format": "date-time"})
    """When the trainer reached this step or entered this phase (RFC 3339, the trainer's clock)."""

    step_seconds: float | None = None
    """Median wall time of rank 0's recent training steps."""

    report_interval_seconds: float | None = None
    """Expected seconds between two progress reports while training: the larger of the report interval and
    logEverySteps x stepSeconds (the operator's stall limit is derived from it)."""

    data_wait_percent: float | None = None
    """Share of rank 0's recent step time spent waiting for the next batch (data-loader starvation), in percent."""


class GeneralSourceReport(StatusModel):
    """The general held-out loss of one eval.general source (written by the trainer)."""

    uri: str = Field(min_length=1, max_length=URI_MAX)
    """The source, as in spec.eval.general (or spec.data.general when no eval set is given)."""

    loss: float | None = None
    """Mean loss on this source's held-out tokens."""

    forgetting_percent: float | None = None
    """Rise of this source's loss over the base model's, in percent: which general ability is being lost."""


class Latest(StatusModel):
    """The latest evaluation and throughput figures (written by the trainer)."""

    domain_loss: float | None = None
    """Domain held-out loss."""

    general_loss: float | None = None
    """General held-out loss."""

    forgetting_percent: float | None = None
    """(generalLoss - baseline.generalLoss) / baseline.generalLoss, in percent; with spec.eval.unseenGeneral, the
    worse of that and unseenForgettingPercent."""

    domain_gain_percent: float | None = None
    """(baseline.domainLoss - domainLoss) / baseline.domainLoss, in percent."""

    tokens_per_second: float | None = None
    """Training throughput over all ranks."""

    mfu: float | None = None
    """Model FLOPs utilisation estimate (0-1), on GPU."""

    learning_rate: float | None = None
    """Current learning rate."""

    realised_domain_percent: float | None = None
    """Share of domain tokens actually consumed so far, in percent."""

    realised_domain_gradient_percent: float | None = None
    """Share of the tokens that carried loss (so of the gradient: every such token weighs the same) that came from
    domain sources so far, in percent. Equals realisedDomainPercent for cpt; see spec.data.mixBy."""

    forgetting_stderr_percent: float | None = None
    """Standard error of forgettingPercent, in points (paired per-sequence differences to the base model)."""

    kl_base_nats: float | None = None
    """KL(base || model) per general held-out token, in nats, over the base's top spec.eval.klTopK tokens (a lower
    bound of the full KL)."""

    general_forgetting_percent: float | None = None
    """Forgetting on the replayed general held-out set alone, in percent (reported with spec.eval.unseenGeneral,
    when forgettingPercent is the worse of it and unseenForgettingPercent)."""

    unseen_loss: float | None = Field(default=None, ge=0)
    """Loss on the never-replayed general sets (spec.eval.unseenGeneral)."""

    unseen_forgetting_percent: float | None = None
    """Forgetting on the never-replayed general sets, in percent."""

    unseen_stderr_percent: float | None = Field(default=None, ge=0)
    """Standard error of unseenForgettingPercent, in points (paired per-sequence differences to the base model)."""

    general_sources: list[GeneralSourceReport] | None = Field(default=None, max_length=64)
    """General held-out loss and forgetting per source."""


class CheckpointReport(StatusModel):
    """One checkpoint, or one candidate built from checkpoints at the end of the run, reported by the trainer."""

    step: int = Field(ge=0)
    """Optimizer step of the checkpoint; for an interpolation, the step of the fine-tuned checkpoint it blends with
    the base model; for an average, the last step averaged."""

    uri: str = Field(min_length=1, max_length=URI_MAX)
    """Where the checkpoint (or candidate) lies."""

    kind: CandidateKind | None = None
    """checkpoint (omitted: the same), average (uniform average of the checkpoints in averageOf) or interpolation
    (WiSE-FT: weights (1 - alpha) * base + alpha * checkpoint 'step')."""

    alpha: float | None = Field(default=None, ge=0, le=1)
    """kind interpolation: the weight of the fine-tuned checkpoint (0 is the base model, 1 the checkpoint)."""

    average_of: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=100)
    """kind average: the steps of the averaged checkpoints."""

    domain_loss: float | None = None
    """Domain held-out loss at this step."""

    general_loss: float | None = None
    """General held-out loss at this step."""

    forgetting_percent: float | None = None
    """Forgetting at this step, in percent: the worse of generalForgettingPercent and unseenForgettingPercent when
    spec.eval.unseenGeneral is given."""

    domain_gain_percent: float | None = None
    """Domain gain at this step, in percent."""

    kl_base_nats: float | None = None
    """KL(base || model) per general held-out token, in nats (see latest.klBaseNats)."""

    forgetting_stderr_percent: float | None = None
    """Standard error of forgettingPercent, in points; selection uses it (spec.checkpoints.budgetConfidencePercent)."""

    general_forgetting_percent: float | None = None
    """Forgetting on the replayed general held-out set alone, in percent (reported with spec.eval.unseenGeneral,
    when forgettingPercent is the worse of it and unseenForgettingPercent)."""

    unseen_loss: float | None = Field(default=None, ge=0)
    """Loss on the never-replayed general sets (spec.eval.unseenGeneral)."""

    unseen_forgetting_percent: float | None = None
    """Forgetting on the never-replayed general sets, in percent."""

    unseen_stderr_percent: float | None = Field(default=None, ge=0)
    """Standard error of unseenForgettingPercent, in points (paired per-sequence differences to the base model)."""

    complete: bool | None = None
    """False while the upload is unfinished; only complete checkpoints (true or unset) can be selected."""


class CheckpointsOmitted(StatusModel):
    """The complete checkpoints status.checkpoints leaves out (neither among the newest nor on the Pareto set).

    They stay in the output; the trainer's state file of the latest checkpoint (forge/state.json) lists them all.
    """

    count: int = Field(ge=1)
    """How many are left out."""

    first_step: int = Field(ge=0)
    """The earliest step left out."""

    last_step: int = Field(ge=0)
    """The latest step left out."""


class CandidateRef(StatusModel):
    """Which checkpoint or end-of-run candidate: what status.selected and status.paretoFront point at."""

    step: int = Field(ge=0)
    """Step of the checkpoint (for an interpolation: of the fine-tuned checkpoint; for an average: the last one)."""

    uri: str = Field(min_length=1, max_length=URI_MAX)
    """Where it lies."""

    kind: CandidateKind = "checkpoint"
    """checkpoint, average or interpolation."""

    alpha: float | None = Field(default=None, ge=0, le=1)
    """kind interpolation: the weight of the fine-tuned checkpoint."""

    average_of: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=100)
    """kind average: the averaged steps."""

    forgetting_percent: float | None = None
    """Its forgetting, in percent."""

    domain_gain_percent: float | None = None
    """Its domain gain, in percent."""


class Selected(CandidateRef):
    """The checkpoint or candidate chosen by spec.checkpoints.selection."""

    policy: SelectionPolicy
    """The policy that chose it."""

    reason: str = Field(max_length=STATUS_TEXT_MAX)
    """Why it was chosen, naming its kind."""


class Suggestion(StatusModel):
    """What the trainer's guard suggests changing for the next run."""

    learning_rate: str | None = Field(default=None, max_length=32, pattern=DECIMAL_PATTERN)
    """A lower peak learning rate, as a decimal string."""

    domain_percent: int | None = Field(default=None, ge=1, le=100)
    """A lower domain share (a higher general share), in percent of the training tokens."""


class EarlyStop(StatusModel):
    """Written by the trainer's guard when a rule fires: it stopped the run (action stop), warned, or rebalanced."""

    step: int | None = Field(default=None, ge=0)
    """Step at which the rule fired."""

    reason: str = Field(min_length=1, max_length=128, pattern=REASON_PATTERN)
    """CamelCase reason: LearningRateTooHigh, ForgettingBudgetExceeded, LossDiverged, NonFiniteLoss, GradNormSpikes
    or NoDomainProgress."""

    rule: str | None = Field(default=None, max_length=128)
    """Name of the guard rule that fired."""

    message: str = Field(default="", max_length=32_768)
    """What happened and what to change."""

    action: ForgettingAction | None = None
    """What the trainer did: stop (omitted: the same; the run ends), warn (it goes on) or rebalance (it goes on with
    a higher general share, recorded in status.rebalance)."""

    suggestion: Suggestion | None = None
    """Settings the guard suggests for the next run."""


class Rebalance(StatusModel):
    """Written by the trainer when the guard (action rebalance) raised the general share for the rest of the run."""

    step: int = Field(ge=0)
    """Step from which the new mix applies."""

    domain_percent: int = Field(ge=1, le=100)
    """The domain share from that step on, in percent of the training tokens."""

    previous_domain_percent: int | None = Field(default=None, ge=1, le=100)
    """The domain share before (omitted: spec.data.domainPercent)."""

    reason: str = Field(default="", max_length=32_768)
    """Why (the guard's reason and figures)."""


class ProbeMultiple(StatusModel):
    """One probed multiple of the learning rate (written by the trainer)."""

    multiplier: float = Field(ge=0, le=100)
    """The multiple of status.resolved.learningRate."""

    learning_rate: float = Field(ge=0, le=1)
    """The peak learning rate of this multiple."""

    projected_forgetting_percent: float | None = None
    """Forgetting projected to the end of the whole run at this rate, in percent; omitted when the probe run had a
    non-finite loss."""

    projected_low_percent: float | None = None
    """Lower end of the projection's 90% interval (from the fitted slope's standard error), in percent."""

    projected_high_percent: float | None = None
    """Upper end of the projection's 90% interval, in percent."""

    extrapolation_capped: bool | None = None
    """True when the run goes more than 30 times past the probe's cumulative learning rate: the projection stops
    there rather than extrapolating a short line further."""

    measured_forgetting_percent: float | None = None
    """Forgetting measured at the end of the probe run, in percent."""


class LrProbe(StatusModel):
    """What the learning-rate probe chose (written by the trainer, spec.training.learningRateProbe)."""

    learning_rate: float = Field(ge=0, le=1)
    """The peak learning rate the run trains at."""

    multiplier: float = Field(ge=0, le=100)
    """That rate as a multiple of status.resolved.learningRate."""

    reason: str = Field(default="", max_length=32_768)
    """Why this multiple: the highest projected within the forgetting budget, or the lowest when none is."""

    multiples: list[ProbeMultiple] = Field(default_factory=list, max_length=8)
    """Every probed multiple with its projected and measured forgetting."""


class TrainerError(StatusModel):
    """Written by a trainer rank just before it exits with an error, so that the cause reaches the status."""

    kind: str = Field(min_length=1, max_length=128)
    """The error's kind: DataError, ConfigError, ModelError, StorageError, StorageUnavailableError, or the Python
    exception of an unexpected failure."""

    message: str = Field(default="", max_length=4096)
    """What went wrong; for data errors it names the file and line."""

    exit_code: int = Field(ge=0, le=255)
    """The rank's exit code (docs/trainer.md lists them)."""

    retryable: bool = False
    """True when the exit code is one that restartPolicy ExitCode retries (128 and above)."""

    rank: int = Field(default=0, ge=0, le=1_000_000)
    """The rank that failed."""

    time: str | None = Field(default=None, max_length=64)
    """When it failed (RFC 3339)."""

    raised_at: str | None = Field(default=None, max_length=512)
    """Where in the trainer's code the error was raised (file:line)."""


class PodRef(StatusModel):
    """A pod the operator deleted (name and uid)."""

    name: str = Field(min_length=1, max_length=253)
    """Pod name."""

    uid: str = Field(min_length=1, max_length=64)
    """Pod uid (a pod of the same name created later is not the same pod)."""


class StallRestart(StatusModel):
    """One stall restart of the operator."""

    time: str = Field(max_length=64, json_schema_extra={"format": "date-time"})
    """When the operator decided it (RFC 3339)."""

    step: int | None = Field(default=None, ge=0)
    """The last step reported before the stall."""

    pods: list[PodRef] = Field(default_factory=list, max_length=1024)
    """The pods deleted to restart the run."""


class StragglerReport(StatusModel):
    """The rank the trainer names a straggler (written by the trainer)."""

    rank: int = Field(ge=0)
    """The slow rank."""

    pod: str | None = Field(default=None, max_length=253)
    """Its pod."""

    node: str | None = Field(default=None, max_length=253)
    """Its node."""

    step_seconds: float | None = None
    """Its median own compute seconds per step."""

    median_seconds: float | None = None
    """The other ranks' median of the same figure."""

    read_backs: int | None = Field(default=None, ge=0)
    """Read-backs in a row it was slow for."""


class ThroughputDropReport(StatusModel):
    """A drop of the job's tokens/s below spec.monitoring.throughputDropPercent of its running median."""

    tokens_per_second: float | None = None
    """The job's tokens/s at the latest read-back."""

    median_tokens_per_second: float | None = None
    """Its running median before the drop."""

    read_backs: int | None = Field(default=None, ge=0)
    """Read-backs in a row it was low for."""


class PaceReport(StatusModel):
    """Stragglers and throughput drops, as the trainer judges them at its read-backs (written by rank 0 when they
    change; the operator turns them into the ThroughputDegraded condition)."""

    ranks: int | None = Field(default=None, ge=0)
    """Ranks compared."""

    step: int | None = Field(default=None, ge=0)
    """The step of this report."""

    time: str | None = Field(default=None, max_length=64, json_schema_extra={"format": "date-time"})
    """When it was made (RFC 3339, the trainer's clock)."""

    straggler: StragglerReport | None = None
    """The straggler (omitted: none)."""

    throughput_drop: ThroughputDropReport | None = None
    """The throughput drop (omitted: none)."""


class ForgeJobStatus(StatusModel):
    """Observed state; the operator and the trainer (progress, latest, checkpoints, baseline) write it."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the operator last reconciled."""

    state: State | None = None
    """Summary for people and the State column; derived from the conditions."""

    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Conditions keyed by type."""

    pytorch_job: str | None = Field(default=None, max_length=253)
    """Name of the PyTorchJob running this ForgeJob (backend pytorchjob)."""

    train_job: str | None = Field(default=None, max_length=253)
    """Name of the TrainJob running this ForgeJob (backend trainjob)."""

    resolved: Resolved | None = None
    """Resolved training values."""

    baseline: Baseline | None = None
    """Base-model losses (trainer)."""

    progress: Progress | None = None
    """Run progress (trainer)."""

    latest: Latest | None = None
    """Latest evaluation (trainer)."""

    checkpoints: list[CheckpointReport] = Field(default_factory=list, max_length=STATUS_CHECKPOINTS_MAX)
    """Checkpoints reported by the trainer, in step order: the newest 16 and the Pareto set (domain gain, forgetting
    and its standard error), which holds every entry any selection policy can choose; at most 64 (the rest are
    counted in checkpointsOmitted)."""

    checkpoints_omitted: CheckpointsOmitted | None = None
    """Complete checkpoints left out of status.checkpoints to bound its size."""

    selected: Selected | None = None
    """The checkpoint chosen by the selection policy."""

    pareto_front: list[CandidateRef] = Field(default_factory=list, max_length=STATUS_CHECKPOINTS_MAX)
    """The non-dominated checkpoints and candidates (domain gain vs forgetting), with selection 'pareto'."""

    early_stop: EarlyStop | None = None
    """Set by the trainer's guard when a rule fired (stop, warn or rebalance)."""

    rebalance: Rebalance | None = None
    """Set by the trainer when the guard raised the general share (action rebalance)."""

    lr_probe: LrProbe | None = None
    """Set by the trainer after the learning-rate probe (spec.training.learningRateProbe): the rate it trains at."""

    trainer_error: TrainerError | None = None
    """The last error a trainer rank exited with (kind, message, exit code, rank); the Failed condition quotes it."""

    stall_restarts: int | None = Field(default=None, ge=0)
    """Restarts the operator made because the run stalled (spec.monitoring.onStall restart)."""

    last_stall_restart: StallRestart | None = None
    """The operator's latest stall restart: recorded before its pods are deleted, so that an operator restart
    finishes it instead of counting another."""

    pace: PaceReport | None = None
    """Set by the trainer: the straggler rank and the throughput drop it finds (condition ThroughputDegraded)."""

    @field_validator("pareto_front", mode="before")
    @classmethod
    def _drop_bare_steps(cls, value: object) -> object:
        """Objects written before candidates existed held bare steps: the operator recomputes the front anyway."""
        if isinstance(value, list):
            return [item for item in value if not isinstance(item, int)]
        return value


class ForgeJob(ApiModel):
    """The whole ForgeJob object (metadata kept as a plain mapping)."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["forge.dev/v1alpha1"] = "forge.dev/v1alpha1"
    """forge.dev/v1alpha1."""

    kind: Literal["ForgeJob"] = "ForgeJob"
    """ForgeJob."""

    metadata: dict[str, Any] = Field(default_factory=dict)
    """Standard object metadata."""

    spec: ForgeJobSpec
    """Desired state."""

    status: ForgeJobStatus = Field(default_factory=ForgeJobStatus)
    """Observed state."""
