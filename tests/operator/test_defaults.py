"""The defaults table and the resolution of 'auto' values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from forge_operator.api import ForgeJobSpec, ModelSpec
from forge_operator.defaults import (
    DEFAULTS,
    domain_factor,
    format_decimal,
    mix_by,
    model_parameters_millions,
    resolve,
)


def spec(**overrides: Any) -> ForgeJobSpec:
    raw: dict[str, Any] = {
        "model": {"base": "s3://models/llama-3.2-1b/"},
        "technique": "sft",
        "data": {"domain": [{"uri": "s3://d/"}], "general": [{"uri": "s3://g/"}], "seqLength": 4096},
        "checkpoints": {"output": "s3://o/"},
        "resources": {"nodes": 1, "gpusPerNode": 8},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return ForgeJobSpec.model_validate(raw)


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [(2e-5, 2, "2e-5"), (3.6e-05, 2, "3.6e-5"), (0.00025, 2, "2.5e-4"), (1.234e-5, 3, "1.23e-5"), (0.0, 2, "0")],
)
def test_format_decimal(value: float, digits: int, text: str) -> None:
    assert format_decimal(value, digits) == text


@pytest.mark.parametrize(
    ("base", "millions"),
    [
        ("s3://models/llama-3.2-1b/", 1000),
        ("/models/Qwen2.5-0.5B-Instruct", 500),
        ("s3://m/mistral-7b-v0.1", 7000),
        ("s3://m/TinyLlama-1.1B-Chat", 1100),
        ("s3://m/smollm-360m", 360),
        ("s3://m/Llama-3.1-70B/", 70000),
        ("s3://m/gpt2", None),
        ("s3://m/phi-3-mini-4k", None),
    ],
)
def test_model_size_from_the_folder_name(base: str, millions: int | None) -> None:
    assert model_parameters_millions(ModelSpec(base=base))[0] == millions


def test_explicit_model_size_wins() -> None:
    size, why = model_parameters_millions(ModelSpec(base="s3://m/llama-70b", parameters_millions=1300))
    assert size == 1300 and "parametersMillions" in why


@pytest.mark.parametrize("technique", ["cpt", "sft", "lora"])
def test_auto_learning_rate_at_the_reference_point_is_the_table_value(technique: str) -> None:
    row = DEFAULTS[technique]  # type: ignore[index]
    resolved = resolve(
        spec(
            technique=technique,
            model={"base": "s3://m/any", "parametersMillions": row.reference_params_millions},
            training={"globalBatchTokens": row.global_batch_tokens},
        )
    )
    assert float(resolved.learning_rate) == pytest.approx(row.learning_rate)
    assert resolved.learning_rate_source == "auto"
    assert resolved.learning_rate_why.startswith(f"auto: {technique} table {format_decimal(row.learning_rate)} at ")


@pytest.mark.parametrize(
    ("technique", "base", "published"),
    [
        ("sft", "s3://m/llama-2-7b", 2e-5),  # Llama 2-Chat, Alpaca, Tülu 2 at 7B
        ("sft", "s3://m/llama-2-70b", 1e-5),  # Tülu 2 at 70B
        ("lora", "s3://m/llama-7b", 2e-4),  # QLoRA 7B
        ("lora", "s3://m/llama-65b", 1e-4),  # QLoRA 65B
    ],
)
def test_the_table_reproduces_the_published_points(technique: str, base: str, published: float) -> None:
    """At the table's batch and 25% general replay, the size scaling lands on the rates the sources used."""
    row = DEFAULTS[technique]  # type: ignore[index]
    resolved = resolve(
        spec(technique=technique, model={"base": base}, training={"globalBatchTokens": row.global_batch_tokens})
    )
    assert float(resolved.learning_rate) == pytest.approx(published, rel=0.03)


def test_auto_learning_rate_falls_with_model_size_within_bounds() -> None:
    rates = [
        float(resolve(spec(model={"base": f"s3://m/llama-{size}b"})).learning_rate) for size in ("1", "8", "70", "405")
    ]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 4
    tiny = float(resolve(spec(model={"base": "s3://m/tiny", "parametersMillions": 3})).learning_rate)
    assert tiny == pytest.approx(2 * DEFAULTS["sft"].learning_rate)  # size factor clamped at 2
    assert rates[-1] >= 0.25 * DEFAULTS["sft"].learning_rate


@pytest.mark.parametrize(("domain_percent", "factor"), [(50, 1.0), (75, 1.0), (90, 0.7), (100, 0.5)])
def test_less_general_replay_lowers_the_auto_learning_rate(domain_percent: int, factor: float) -> None:
    assert domain_factor(domain_percent) == pytest.approx(factor)
    data = {"domainPercent": domain_percent, "domain": [{"uri": "s3://d/"}], "general": [{"uri": "s3://g/"}]}
    resolved = resolve(spec(model={"base": "s3://m/llama-7b"}, data=data))
    assert float(resolved.learning_rate) == pytest.approx(2e-5 * factor)
    assert f"domain factor {factor:.3g}" in resolved.learning_rate_why


def test_a_written_learning_rate_ignores_the_domain_factor() -> None:
    data = {"domainPercent": 100, "domain": [{"uri": "s3://d/"}]}
    resolved = resolve(spec(data=data, training={"learningRate": "3e-5"}, eval={"general": [{"uri": "s3://g/"}]}))
    assert resolved.learning_rate == "3e-5"


def test_lora_learning_rate_is_an_order_of_magnitude_above_full_fine_tuning() -> None:
    lora = float(resolve(spec(technique="lora", model={"base": "s3://m/llama-7b"})).learning_rate)
    full = float(resolve(spec(technique="sft", model={"base": "s3://m/llama-7b"})).learning_rate)
    assert lora == pytest.approx(2e-4)
    assert 5 <= lora / full <= 30


def test_auto_learning_rate_follows_the_square_root_of_the_batch() -> None:
    base = resolve(spec(training={"globalBatchTokens": 262_144}))
    quadruple = resolve(spec(training={"globalBatchTokens": 1_048_576}))
    assert float(quadruple.learning_rate) == pytest.approx(2 * float(base.learning_rate))


def test_written_learning_rate_is_kept_exactly() -> None:
    resolved = resolve(spec(training={"learningRate": "1.234e-5", "minLearningRatePercent": 10}))
    assert resolved.learning_rate == "1.234e-5" and resolved.learning_rate_source == "spec"
    assert resolved.min_learning_rate == "1.23e-6"


def test_gradient_accumulation_and_world_size() -> None:
    resolved = resolve(spec(resources={"nodes": 2, "gpusPerNode": 8}, training={"microBatchSize": 2}))
    # 262144 / (4096 * 2 * 16) = 2
    assert resolved.world_size == 16
    assert resolved.gradient_accumulation_steps == 2
    assert resolved.global_batch_tokens == 262_144
    assert resolved.global_batch_sequences == 64
    assert resolved.total_tokens == 262_144 * 1000


def test_rounding_is_recorded_and_accumulation_is_at_least_one() -> None:
    resolved = resolve(spec(resources={"nodes": 3, "gpusPerNode": 0}, training={"microBatchSize": 4}))
    assert resolved.world_size == 3
    assert resolved.gradient_accumulation_steps == 5  # 262144 / 49152 = 5.33
    assert any("differs from the target" in note for note in resolved.notes)
    big = resolve(spec(resources={"nodes": 64, "gpusPerNode": 8}, training={"microBatchSize": 8}))
    assert big.gradient_accumulation_steps == 1


def test_warmup_steps_and_notes() -> None:
    resolved = resolve(spec(training={"maxSteps": 2000, "warmupPercent": 3}))
    assert resolved.warmup_steps == 60
    assert any("eval.domain not given" in note for note in resolved.notes)
    with_eval = resolve(spec(eval={"domain": [{"uri": "s3://held/d"}], "general": [{"uri": "s3://held/g"}]}))
    assert not any("not given" in note for note in with_eval.notes)


def test_hold_out_note_names_the_split() -> None:
    notes = resolve(spec(eval={"holdOutPerMille": 50, "general": [{"uri": "s3://held/g"}]})).notes
    held = [note for note in notes if "holding out" in note]
    assert len(held) == 1 and held[0].startswith("eval.domain not given: holding out 50 per mille of the data.domain")
    assert "hash of each document" in held[0] and "training skips them" in held[0]


GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"


def _defaults_section() -> str:
    return GUIDE.read_text().split("## Defaults and their sources\n", 1)[1].split("\n## ", 1)[0]


def test_every_source_of_the_table_is_a_reference_in_the_user_guide() -> None:
    text, references = _defaults_section().split("References:", 1)
    defined = set(re.findall(r"^- \[([a-z]+\d{4})\] ", references, re.MULTILINE))
    cited_keys = set(re.findall(r"\[([a-z]+\d{4})\]", text))
    for technique, row in DEFAULTS.items():
        assert set(row.sources) <= defined, f"{technique}: {set(row.sources) - defined} not in the references"
        assert set(row.sources) <= cited_keys, f"{technique}: {row.sources} not cited in the text"
    assert cited_keys <= defined, f"cited but not listed: {cited_keys - defined}"
    assert defined <= cited_keys, f"listed but never cited: {defined - cited_keys}"


@pytest.mark.parametrize("technique", ["cpt", "sft", "lora"])
def test_the_documented_table_matches_the_code(technique: str) -> None:
    row = DEFAULTS[technique]  # type: ignore[index]
    line = next(line for line in _defaults_section().splitlines() if line.startswith(f"| `{technique}` |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[1].startswith(format_decimal(row.learning_rate)), cells
    assert cells[2].startswith(f"{row.reference_params_millions // 1000}B"), cells
    assert cells[3].startswith(f"{row.global_batch_tokens:,}"), cells


@pytest.mark.parametrize(
    ("technique", "given", "expected", "noted"),
    [
        ("cpt", None, "tokens", False),
        ("sft", None, "lossTokens", True),
        ("lora", None, "lossTokens", True),
        ("sft", "tokens", "tokens", False),
        ("cpt", "lossTokens", "lossTokens", False),
    ],
)
def test_mix_by_defaults_by_technique(technique: str, given: str | None, expected: str, noted: bool) -> None:
    data = {"domain": [{"uri": "s3://d/"}], "general": [{"uri": "s3://g/"}], "seqLength": 4096}
    job = spec(technique=technique, data=data if given is None else {**data, "mixBy": given})
    assert mix_by(job) == expected
    assert any(note.startswith("data.mixBy lossTokens") for note in resolve(job).notes) == noted
