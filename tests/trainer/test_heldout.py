"""Held-out evaluation on a real tiny Llama: per-source losses and the top-k KL to the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as nnf

from forge_trainer.config import TrainerConfig
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import IGNORE_INDEX, to_micro_batch
from forge_trainer.heldout import EvalSeq, eval_sequences, evaluate_set, topk_kl_sum
from forge_trainer.model import load_tokenizer, pad_token_id
from tests.trainer.conftest import Corpora
from tests.trainer.harness import merged

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)


@pytest.fixture
def two_sources(base_config: dict[str, Any], corpora: Corpora, tiny_model: Path) -> list[EvalSeq]:
    """A general held-out set cut from two different sources (general prose, support tickets)."""
    cfg = TrainerConfig.model_validate(
        merged(base_config, eval={"general": [{"uri": str(corpora.eval_general)}, {"uri": str(corpora.eval_domain)}]})
    )
    tokenizer = load_tokenizer(tiny_model)
    return eval_sequences(cfg.eval.general, 2048, cfg, DocEncoder(tokenizer, False), pad_token_id(tokenizer))


def test_topk_kl_equals_the_full_kl_when_k_covers_the_vocabulary() -> None:
    torch.manual_seed(1)
    base = torch.log_softmax(torch.randn(7, 50) * 2, dim=-1)
    model = torch.log_softmax(torch.randn(7, 50) * 2, dim=-1)
    full = (base.exp() * (base - model)).sum()
    top = base.topk(50, dim=-1)
    assert float(topk_kl_sum(top.values, top.indices, model)) == pytest.approx(float(full), rel=1e-5)
    # Fewer tokens: a lower bound (coarsening can only lose information), still non-negative.
    small = base.topk(5, dim=-1)
    bound = float(topk_kl_sum(small.values, small.indices, model))
    assert 0.0 <= bound < float(full)
    # Identical distributions: zero whatever k is.
    assert float(topk_kl_sum(small.values, small.indices, base)) == pytest.approx(0.0, abs=1e-6)


def test_per_source_losses_match_each_source_alone_and_combine_to_the_mean(
    model: Any, two_sources: list[EvalSeq]
) -> None:
    assert {s.source for s in two_sources} == {0, 1}
    whole, cache = evaluate_set(model, CPU, two_sources, 2, 3, 0, 1)
    assert cache is None and whole.kl is None
    assert whole.mean is not None and None not in whole.per_source
    per_source = []
    for source in (0, 1):
        alone = [EvalSeq(s.ids, s.mask, 0, s.positions) for s in two_sources if s.source == source]
        result, _ = evaluate_set(model, CPU, alone, 1, 2, 0, 1)
        assert result.mean == pytest.approx(whole.per_source[source], rel=1e-6)
        per_source.append(result.mean)
    # The two sources are different text (the model is untrained, so only slightly): the mean lies between them.
    low, high = sorted(x for x in per_source if x is not None)
    assert low < whole.mean < high
    ids, labels, positions = to_micro_batch([(s.ids, s.mask, s.positions) for s in two_sources])
    assert positions is not None, "held-out sequences keep attention inside documents, as training does"
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1, :]
    expected = nnf.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert whole.mean == pytest.approx(float(expected), rel=1e-5)


def test_kl_is_zero_for_the_base_and_exact_for_a_moved_model(model: Any, two_sources: list[EvalSeq]) -> None:
    vocab = int(model.config.vocab_size)
    base_result, cache = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, build_top_k=vocab)
    assert cache is not None and set(cache) == set(range(len(two_sources)))
    _, small_cache = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, build_top_k=4)
    assert small_cache is not None and next(iter(small_cache.values())).logp.shape[1] == 4
    same, _ = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, kl_cache=cache)
    assert same.kl == pytest.approx(0.0, abs=1e-6)
    assert same.mean == pytest.approx(base_result.mean, rel=1e-7)

    ids, labels, positions = to_micro_batch([(s.ids, s.mask, s.positions) for s in two_sources])
    with torch.no_grad():
        base_logp = torch.log_softmax(
            model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1, :], dim=-1
        )
    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
        moved, _ = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, kl_cache=cache)
        bound, _ = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, kl_cache=small_cache)
        with torch.no_grad():
            moved_logp = torch.log_softmax(
                model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1, :], dim=-1
            )
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    labelled = labels[:, 1:] != IGNORE_INDEX
    full = (base_logp.exp() * (base_logp - moved_logp)).sum(-1)[labelled].mean()
    assert moved.kl is not None and moved.kl > 1e-4
    assert moved.kl == pytest.approx(float(full), rel=1e-4)  # k = vocabulary: the top-k KL is the full KL
    assert bound.kl is not None and 0.0 < bound.kl < moved.kl  # a small k: a lower bound of the same quantity


def test_paired_standard_error_of_the_loss_difference_to_the_base(model: Any, two_sources: list[EvalSeq]) -> None:
    base, _ = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1)
    assert base.sequences is not None and set(base.sequences) == set(range(len(two_sources)))
    assert base.paired_stderr is None  # no base losses given
    same, _ = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, base_losses=base.sequences)
    assert same.paired_stderr == pytest.approx(0.0, abs=1e-9)  # the base against itself: every difference is 0

    saved = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
        moved, _ = evaluate_set(model, CPU, two_sources, 2, 4, 0, 1, base_losses=base.sequences)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert moved.sequences is not None
    diffs = torch.tensor([moved.sequences[i] - base.sequences[i] for i in base.sequences], dtype=torch.float64)
    expected = float(diffs.std(unbiased=True) / len(diffs) ** 0.5)
    assert moved.paired_stderr is not None and moved.paired_stderr > 0
    assert moved.paired_stderr == pytest.approx(expected, rel=1e-6)
