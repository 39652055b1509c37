"""The chunked linear cross-entropy: the same loss and gradients as the full logits (cpt, sft masks, LoRA, bf16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forge_trainer.config import LoraSettings, ModelSettings
from forge_trainer.data.loader import IGNORE_INDEX
from forge_trainer.engine import ChunkedLinearCrossEntropy, token_loss_sum
from forge_trainer.model import wrap_lora
from tests.trainer.conftest import Corpora
from tests.trainer.harness import assert_ok, merged, run_ranks, write_config


def _model(tied: bool = False) -> Any:
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def _batch(masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 40), generator=gen)
    labels = ids.clone()
    if masked:  # sft: loss on some spans only, one row without any
        labels[0, :25] = IGNORE_INDEX
        labels[1, 10:30] = IGNORE_INDEX
        labels[2, :] = IGNORE_INDEX
    return ids, labels


def _loss_and_grads(
    model: Any, ids: torch.Tensor, labels: torch.Tensor, chunk: int
) -> tuple[float, int, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    total, count = token_loss_sum(model, ids, labels, chunk)
    (total * 0.37).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), int(count), grads


def _assert_grads_close(got: dict[str, Any], want: dict[str, Any], rel: float) -> None:
    """Every gradient within ``rel`` of its tensor's largest entry (summation order differs between the paths)."""
    for name, grad in want.items():
        scale = float(grad.float().abs().max())
        assert scale > 0, name
        torch.testing.assert_close(got[name].float(), grad.float(), rtol=0.0, atol=rel * scale, msg=name)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [7, 16, 1000])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_logits(masked: bool, chunk: int, tied: bool) -> None:
    model = _model(tied)
    ids, labels = _batch(masked)
    full, n_full, g_full = _loss_and_grads(model, ids, labels, 0)
    part, n_part, g_part = _loss_and_grads(model, ids, labels, chunk)
    assert n_part == n_full > 0
    assert part == pytest.approx(full, rel=1e-6)
    assert g_part.keys() == g_full.keys()
    assert ("lm_head.weight" in g_full) != tied  # tied: the head's gradient lands in the embedding
    _assert_grads_close(g_part, g_full, 1e-5)


def test_chunked_loss_with_lora() -> None:
    settings = ModelSettings(base="unused", technique="lora", lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    model = wrap_lora(_model(), settings)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without gradient
            param.data.normal_(0.0, 0.05)
    ids, labels = _batch(masked=True)
    full, _, g_full = _loss_and_grads(model, ids, labels, 0)
    part, _, g_part = _loss_and_grads(model, ids, labels, 9)
    assert part == pytest.approx(full, rel=1e-6)
    assert g_full and all("lora_" in name for name in g_full)  # the head is frozen: no gradient for it
    assert g_part.keys() == g_full.keys()
    _assert_grads_close(g_part, g_full, 1e-5)


def test_chunked_loss_in_bf16_is_as_close_to_fp32_as_the_full_logits() -> None:
    ids, labels = _batch(masked=False)
    ref, _, g_ref = _loss_and_grads(_model(), ids, labels, 0)
    model = _model().to(torch.bfloat16)
    full, _, g_full = _loss_and_grads(model, ids, labels, 0)
    part, _, g_part = _loss_and_grads(model, ids, labels, 16)
    assert part == pytest.approx(full, rel=1e-4) and part == pytest.approx(ref, rel=1e-3)
    assert all(g.dtype == torch.bfloat16 for g in g_part.values())

    def worst(grads: dict[str, Any]) -> float:
        return max(float((grads[n].float() - g).abs().max() / g.abs().max()) for n, g in g_ref.items())

    assert worst(g_part) <= 1.5 * worst(g_full)


def test_chunked_cross_entropy_without_gradients() -> None:
    hidden = torch.randn(10, 8)
    weight = torch.randn(20, 8)
    labels = torch.tensor([1, 2, IGNORE_INDEX, 4, 5, 6, 7, 8, 9, IGNORE_INDEX])
    with torch.no_grad():
        total = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, 3)
    expect = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert float(total) == pytest.approx(float(expect), rel=1e-6)


def _run_losses(cfg: dict[str, Any], work: Path) -> dict[int, float]:
    results = run_ranks(write_config(work / "config.json", cfg), 2, work / "ranks")
    assert_ok(results)
    return {int(e["step"]): float(e["loss"]) for e in results[0].events if e["event"] == "step"}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("technique", ["cpt", "lora"])
def test_training_with_the_chunked_loss_follows_the_full_logits(
    base_config: dict[str, Any], corpora: Corpora, tmp_path: Path, technique: str
) -> None:
    """Real ranks (2, gloo, ZeRO-2, fp32): every step's loss within float noise of the full-logits run; LoRA on chat
    records (sft masks: loss on assistant tokens only)."""
    cfg = merged(
        base_config,
        training={"maxSteps": 6, "logEverySteps": 3},
        eval={"everySteps": 100},
        checkpoints={"everySteps": 100, "exportHf": False, "candidates": {"averageLast": 0, "interpolationAlphas": []}},
    )
    if technique == "lora":
        cfg = merged(
            cfg,
            model={"technique": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
            data={"domainPercent": 80, "domain": [{"uri": str(corpora.chat)}]},
            training={"learningRate": 2e-2},
        )
    runs = []
    for chunk in (0, 24):
        work = tmp_path / f"chunk{chunk}"
        runs.append(
            _run_losses(
                merged(
                    cfg,
                    training={"lossChunkTokens": chunk},
                    checkpoints={"output": str(work / "output"), "localDir": str(work / "local")},
                ),
                work,
            )
        )
    full, chunked = runs
    assert sorted(full) == sorted(chunked) == list(range(1, 7))
    assert full[6] < full[1]  # it trains
    for step, loss in full.items():
        assert chunked[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
