"""Attention inside documents: packed sequences carry position ids that restart at every document, and with them
(and no attention mask) the model attends only within each document; the attention kernel is a setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from forge_trainer import tiny
from forge_trainer.config import ModelSettings, TrainerConfig
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import IGNORE_INDEX, Layout, build_mixer, plan_mix, step_batches
from forge_trainer.data.pack import PackedSource, SourceLimits, fragment_positions
from forge_trainer.data.records import TextRecord
from forge_trainer.data.sources import resolve_source
from forge_trainer.engine import token_loss_sum
from forge_trainer.errors import ModelError
from forge_trainer.model import check_attention_implementation, load_model, load_tokenizer
from tests.trainer.harness import merged


def test_positions_restart_at_every_fragment() -> None:
    assert fragment_positions([3, 2, 1]).tolist() == [0, 1, 2, 0, 1, 0]
    assert fragment_positions([4]).tolist() == [0, 1, 2, 3]


def test_a_packed_sequence_restarts_its_positions_where_each_document_starts(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    texts = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota kappa lambda mu", "nu xi"]
    tiny.write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    encoder = DocEncoder(tokenizer, assistant_only=False)
    lengths = [len(d) for d in encoder.encode([TextRecord(t) for t in texts])]
    limits = SourceLimits(max_repetition=4.0, max_bad_lines=0, single_pass=False)
    seq_len = sum(lengths[:2]) + 3  # the third document is cut after 3 tokens
    packed = PackedSource(resolve_source(str(tmp_path / "docs.jsonl")), "t/0", encoder, seq_len, 0, limits)
    first = packed.next_sequence()
    assert first.positions.tolist() == [*range(lengths[0]), *range(lengths[1]), 0, 1, 2]
    assert first.ids[lengths[0]] == tokenizer.bos_token_id  # a document starts where the positions restart
    second, third = packed.next_sequence(), packed.next_sequence()
    # The rest of the cut document starts the next sequences at 0: positions never exceed seqLength.
    assert lengths[2] - 3 > seq_len and second.positions.tolist() == list(range(seq_len))
    rest = lengths[2] - 3 - seq_len
    assert third.positions.tolist() == [*range(rest), *range(lengths[3]), *range(seq_len - rest - lengths[3])]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_with_document_positions_a_document_sees_only_itself(tiny_model: Path, implementation: str) -> None:
    settings = ModelSettings.model_validate(
        {"base": str(tiny_model), "technique": "cpt", "attentionImplementation": implementation}
    )
    model = load_model(tiny_model, settings)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, 500, (1, 11), generator=generator)
    second = torch.randint(3, 500, (1, 13), generator=generator)
    packed = torch.cat([first, second], dim=1)
    positions = torch.from_numpy(fragment_positions([11, 13]).astype(np.int64)).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=second).logits
        inside = model(input_ids=packed, position_ids=positions).logits[:, 11:]
        across = model(input_ids=packed).logits[:, 11:]
    torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-4)
    assert (across - alone).abs().max() > 1e-3  # plain causal attention sees the first document


def test_the_loss_of_a_packed_sequence_is_the_sum_of_its_documents(tiny_model: Path) -> None:
    model = load_model(tiny_model, ModelSettings.model_validate({"base": str(tiny_model), "technique": "cpt"}))
    model.eval()
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 500, (1, n), generator=generator) for n in (9, 7, 16)]
    packed = torch.cat(docs, dim=1)
    labels = packed.clone()
    starts = np.cumsum([0, 9, 7])
    # A document's first token is not predicted from the one before it (it is a new document).
    labels[0, starts[1:]] = IGNORE_INDEX
    positions = torch.from_numpy(fragment_positions([9, 7, 16]).astype(np.int64)).unsqueeze(0)
    with torch.no_grad():
        total, count = token_loss_sum(model, packed, labels, positions=positions)
        parts = [token_loss_sum(model, d, d.clone()) for d in docs]
    assert int(count) == sum(int(c) for _, c in parts) == 32 - 3
    assert float(total) == pytest.approx(sum(float(t) for t, _ in parts), rel=1e-5)


def test_training_batches_carry_positions_unless_attention_crosses_documents(
    base_config: dict[str, Any], tiny_model: Path
) -> None:
    for cross, expect in ((False, True), (True, False)):
        cfg = TrainerConfig.model_validate(merged(base_config, data={"crossDocumentAttention": cross}))
        encoder = DocEncoder(load_tokenizer(tiny_model), assistant_only=False)
        plan = plan_mix(cfg.data)
        batch = next(step_batches(build_mixer(plan, cfg, encoder), plan, cfg, Layout(1, 0, 4, 2), 0))
        assert all((mb.positions is not None) == expect for mb in batch.micro)
        if expect:
            positions = batch.micro[0].positions
            assert positions is not None and positions.shape == batch.micro[0].ids.shape
            assert int((positions == 0).sum()) > positions.shape[0], "several documents start in the batch"


def test_flash_attention_without_its_package_or_a_gpu_names_the_field() -> None:
    check_attention_implementation("sdpa")
    check_attention_implementation("eager")
    with pytest.raises(ModelError, match=r"model\.attentionImplementation: flash_attention_2"):
        check_attention_implementation("flash_attention_2")


def test_evaluation_keeps_attention_inside_documents_for_a_model_saved_for_serving(tiny_model: Path) -> None:
    # Exports (and candidates built from them) say use_cache: true; with a KV cache transformers would ignore the
    # position ids' document boundaries, so evaluation must run without one.
    from transformers import AutoModelForCausalLM

    from forge_trainer.heldout import EvalSeq, evaluate_set

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.config.use_cache = True
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 500, (24,), generator=generator).numpy().astype(np.int32)
    packed = [EvalSeq(ids, None, 0, fragment_positions([10, 14]))]
    alone = [EvalSeq(ids[10:], None, 0, None)]
    cpu = torch.device("cpu")
    inside, _ = evaluate_set(model, cpu, packed, 1, 1, 0, 1)
    second, _ = evaluate_set(model, cpu, alone, 1, 1, 0, 1)
    first, _ = evaluate_set(model, cpu, [EvalSeq(ids[:10], None, 0, None)], 1, 1, 0, 1)
    assert inside.mean is not None and first.mean is not None and second.mean is not None
    # 23 predicted positions: 9 in the first document, 13 in the second, and the boundary (the second document's
    # first token predicted from nothing of its own: position 0 of its block sees only itself).
    boundary = inside.mean * 23 - first.mean * 9 - second.mean * 13
    assert boundary > 0
    model.config.use_cache = False
    uncached, _ = evaluate_set(model, cpu, packed, 1, 1, 0, 1)
    assert inside.mean == pytest.approx(uncached.mean, rel=1e-6)
