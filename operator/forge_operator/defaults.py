"""Calibrated defaults per technique and the resolution of 'auto' values into ``status.resolved``.

The numbers are starting points taken from published recipes; docs/user-guide.md ("Defaults and their sources")
gives the source of each one, or says that it is Forge's own choice and why. The mechanism:

    learningRate = table[technique].learningRate
                   * clamp((referenceParams / params) ** sizeExponent, SIZE_FACTOR_BOUNDS)
                   * clamp(sqrt(globalBatchTokens / table[technique].globalBatchTokens), BATCH_FACTOR_BOUNDS)
                   * clamp(0.5 + generalPercent / 50, DOMAIN_FACTOR_BOUNDS)

rounded to two significant digits. The batch factor is the square-root scaling rule for Adam-type optimizers; the
domain factor halves the rate for domain-only data (no general replay) and leaves it whole from 25% general on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from forge_operator.api import ForgeJobSpec, MixBy, ModelSpec, Resolved, ResourcesSpec, Technique


@dataclass(frozen=True)
class TechniqueDefaults:
    """One row of the defaults table."""

    learning_rate: float
    """Peak learning rate at the reference model size and the default global batch."""
    reference_params_millions: int
    """Model size the learning rate is quoted for."""
    size_exponent: float
    """How strongly the learning rate falls with model size: factor (reference / params) ** exponent."""
    global_batch_tokens: int
    """Default tokens per optimizer step, and the batch the learning rate is quoted for."""
    sources: tuple[str, ...]
    """Keys of the references in docs/user-guide.md."""


DEFAULTS: Mapping[Technique, TechniqueDefaults] = MappingProxyType(
    {
        # Forge's choice, an order of magnitude below the re-warmed pretraining maxima of the continual-pretraining
        # studies (a higher maximum adapts more and forgets more); GPT-3's batch at 1.3B.
        "cpt": TechniqueDefaults(
            learning_rate=3e-5,
            reference_params_millions=1_000,
            size_exponent=0.3,
            global_batch_tokens=1_048_576,
            sources=("gupta2023", "ibrahim2024", "brown2020"),
        ),
        # Llama 2-Chat SFT (2e-5, 64 x 4096 tokens), Alpaca 7B and Tülu 2 7B/13B (2e-5).
        "sft": TechniqueDefaults(
            learning_rate=2e-5,
            reference_params_millions=7_000,
            size_exponent=0.3,
            global_batch_tokens=262_144,
            sources=("touvron2023", "taori2023", "ivison2023"),
        ),
        # QLoRA 7B/13B (2e-4; 1e-4 at 33B/65B); the batch is Forge's (the sft batch).
        "lora": TechniqueDefaults(
            learning_rate=2e-4,
            reference_params_millions=7_000,
            size_exponent=0.3,
            global_batch_tokens=262_144,
            sources=("dettmers2023", "biderman2024"),
        ),
    }
)

SIZE_FACTOR_BOUNDS = (0.25, 2.0)
BATCH_FACTOR_BOUNDS = (0.5, 2.0)
DOMAIN_FACTOR_BOUNDS = (0.5, 1.0)
MAX_LEARNING_RATE = 1e-2

# "1b", "0.5B", "350m", "70B" as a whole token of the model folder's name ("llama-3.2-1b", "Qwen2.5-0.5B-Instruct").
_SIZE_TOKEN = re.compile(r"(?<![0-9a-z.])([0-9]+(?:\.[0-9]+)?)([bm])(?![a-z0-9])", re.IGNORECASE)


def clamp(value: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return max(low, min(high, value))


def format_decimal(value: float, digits: int = 2) -> str:
    """``digits`` significant digits in scientific notation without padding: 3.6e-5, 2e-4, 0 for zero."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def parse_decimal(text: str) -> float:
    """A spec decimal string ("2e-5", "0.1") as a float; the CRD pattern has already checked the form."""
    return float(text)


def world_size(resources: ResourcesSpec) -> int:
    """Trainer processes of the whole job: one per GPU, or one per pod on CPU."""
    return resources.nodes * max(resources.gpus_per_node, 1)


def model_parameters_millions(model: ModelSpec) -> tuple[int | None, str]:
    """The model size (millions of parameters) and where it came from."""
    if model.parameters_millions is not None:
        return model.parameters_millions, f"model size {model.parameters_millions}M from spec.model.parametersMillions"
    segment = next((part for part in reversed(model.base.rstrip("/").split("/")) if part), "")
    matches = list(_SIZE_TOKEN.finditer(segment))
    if not matches:
        return None, f"model size unknown (no size token in {segment!r}, no spec.model.parametersMillions)"
    number, unit = matches[-1].groups()
    millions = float(number) * (1000 if unit.lower() == "b" else 1)
    size = max(1, round(millions))
    return size, f"model size {size}M read from {segment!r}"


@dataclass(frozen=True)
class LearningRateChoice:
    value: float
    source: str
    why: str


def learning_rate(spec: ForgeJobSpec, params_millions: int | None, global_batch_tokens: int) -> LearningRateChoice:
    """The peak learning rate: the spec's value, or the table's scaled by model size and global batch."""
    if spec.training.learning_rate != "auto":
        value = parse_decimal(spec.training.learning_rate)
        return LearningRateChoice(value, "spec", f"{spec.training.learning_rate} as written in the spec")
    row = DEFAULTS[spec.technique]
    if params_millions is None:
        size_factor = 1.0
        size_text = f"size factor 1 (size unknown, {row.reference_params_millions}M assumed)"
    else:
        raw = (row.reference_params_millions / params_millions) ** row.size_exponent
        size_factor = clamp(raw, SIZE_FACTOR_BOUNDS)
        size_text = (
            f"size factor {size_factor:.3g} (({row.reference_params_millions}M/{params_millions}M)^"
            f"{row.size_exponent}, clamped to {SIZE_FACTOR_BOUNDS})"
        )
    batch_factor = clamp(math.sqrt(global_batch_tokens / row.global_batch_tokens), BATCH_FACTOR_BOUNDS)
    batch_text = (
        f"batch factor {batch_factor:.3g} (sqrt({global_batch_tokens}/{row.global_batch_tokens}), "
        f"clamped to {BATCH_FACTOR_BOUNDS})"
    )
    general = 100 - spec.data.domain_percent
    domain = domain_factor(spec.data.domain_percent)
    domain_text = f"domain factor {domain:.3g} (0.5 + general share {general}%/50, clamped to {DOMAIN_FACTOR_BOUNDS})"
    value = parse_decimal(format_decimal(row.learning_rate * size_factor * batch_factor * domain))
    why = (
        f"auto: {spec.technique} table {format_decimal(row.learning_rate)} at {row.reference_params_millions}M x "
        f"{size_text} x {batch_text} x {domain_text}"
    )
    return LearningRateChoice(value, "auto", why)


def domain_factor(domain_percent: int) -> float:
    """1 with at least 25% general replay, falling linearly to 0.5 for domain data only (domainPercent 100)."""
    return clamp(0.5 + (100 - domain_percent) / 50, DOMAIN_FACTOR_BOUNDS)


EVALUATIONS_PER_RUN = 20
MAX_EVAL_INTERVAL = 100


def eval_every_steps(spec: ForgeJobSpec) -> int:
    """eval.everySteps, or its default: maxSteps / 20 rounded, between 1 and 100 steps."""
    if spec.eval.every_steps is not None:
        return spec.eval.every_steps
    return min(MAX_EVAL_INTERVAL, max(1, round(spec.training.max_steps / EVALUATIONS_PER_RUN)))


def mix_by(spec: ForgeJobSpec) -> MixBy:
    """data.mixBy, or its default by technique: lossTokens for sft and lora (domainPercent is then the domain's share
    of the gradient), tokens for cpt (every token carries loss: the same mix, in the order cpt runs always had)."""
    if spec.data.mix_by is not None:
        return spec.data.mix_by
    return "tokens" if spec.technique == "cpt" else "lossTokens"


def zero_stage(spec: ForgeJobSpec) -> int:
    """training.zeroStage, or its default by world size: 0 for one process, 2 for more."""
    if spec.training.zero_stage is not None:
        return spec.training.zero_stage
    return 2 if world_size(spec.resources) > 1 else 0


def resolve(spec: ForgeJobSpec) -> Resolved:
    """Every value the trainer needs that the spec leaves to the operator, with the reasons."""
    row = DEFAULTS[spec.technique]
    training = spec.training
    world = world_size(spec.resources)
    tokens_per_micro_step = spec.data.seq_length * training.micro_batch_size * world
    if training.global_batch_tokens is None:
        target = row.global_batch_tokens
        target_note = f"globalBatchTokens target {target} (default for {spec.technique})"
    else:
        target = training.global_batch_tokens
        target_note = f"globalBatchTokens target {target} (spec)"
    accumulation = max(1, math.floor(target / tokens_per_micro_step + 0.5))
    effective = accumulation * tokens_per_micro_step
    params, params_note = model_parameters_millions(spec.model)
    lr = learning_rate(spec, params, effective)
    warmup_steps = math.floor(training.max_steps * training.warmup_percent / 100 + 0.5)
    notes = [
        f"worldSize {world} = nodes {spec.resources.nodes} x max(gpusPerNode {spec.resources.gpus_per_node}, 1)",
        f"{target_note}; gradientAccumulationSteps {accumulation} = round({target} / (seqLength "
        f"{spec.data.seq_length} x microBatchSize {training.micro_batch_size} x worldSize {world})); "
        f"effective globalBatchTokens {effective}",
        params_note,
        f"warmupSteps {warmup_steps} = {training.warmup_percent}% of maxSteps {training.max_steps}",
    ]
    if spec.eval.every_steps is None:
        notes.append(
            f"eval.everySteps {eval_every_steps(spec)} = maxSteps {training.max_steps} / {EVALUATIONS_PER_RUN}, "
            f"between 1 and {MAX_EVAL_INTERVAL}: enough evaluations for the guard to act early in the run"
        )
    if spec.data.mix_by is None and spec.technique != "cpt":
        notes.append(
            f"data.mixBy lossTokens: the default for {spec.technique}, so that domainPercent "
            f"{spec.data.domain_percent} is the domain's share of the tokens that carry loss (the gradient), not of "
            "the input tokens, of which a chat's prompt carries none"
        )
    if training.zero_stage is None:
        notes.append(f"zeroStage {zero_stage(spec)}: the default for worldSize {world} (0 for one process, 2 for more)")
    if effective != target:
        notes.append(
            f"effective globalBatchTokens differs from the target by {100 * (effective - target) / target:+.1f}%"
        )
    notes += hold_out_notes(spec)
    return Resolved(
        learning_rate=spec.training.learning_rate if lr.source == "spec" else format_decimal(lr.value),
        learning_rate_source="auto" if lr.source == "auto" else "spec",
        learning_rate_why=lr.why,
        min_learning_rate=format_decimal(lr.value * training.min_learning_rate_percent / 100, digits=3),
        model_parameters_millions=params,
        world_size=world,
        micro_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        global_batch_tokens=effective,
        global_batch_sequences=effective // spec.data.seq_length,
        warmup_steps=warmup_steps,
        total_tokens=effective * training.max_steps,
        forgetting_budget_percent=spec.forgetting.budget_percent,
        notes=notes,
    )


def hold_out_notes(spec: ForgeJobSpec) -> list[str]:
    """What is evaluated when a held-out group is not given: the split off the training sources."""
    notes = []
    per_mille = spec.eval.hold_out_per_mille
    for group, given, training in (
        ("domain", spec.eval.domain, spec.data.domain),
        ("general", spec.eval.general, spec.data.general),
    ):
        if not given and training:
            notes.append(
                f"eval.{group} not given: holding out {per_mille} per mille of the data.{group} documents (eval."
                "holdOutPerMille), chosen by a hash of each document; training skips them"
            )
    return notes
