"""The document separator fits the model: its end-of-text token, never a chat marker; evaluation does not score it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forge_dev.basemodel import build_base_model
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.records import TextRecord
from forge_trainer.data.separator import choose_separator, is_chat_marker, separator_for
from forge_trainer.data.shards import encoding_fingerprint
from forge_trainer.errors import ModelError

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def toy_folder() -> Path:
    """The toy base model of forge_dev.basemodel (cached by its recipe)."""
    return build_base_model().folder


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _instruct(folder: Path) -> Any:
    """The toy tokenizer turned into an instruct model's: ChatML markers as BOS/EOS, <|endoftext|> in the vocab."""
    tok = _tokenizer(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.bos_token, tok.eos_token, tok.chat_template = "<|im_start|>", "<|im_end|>", CHATML
    return tok


def test_toy_tokenizer_keeps_its_own_bos_and_eos(toy_folder: Path) -> None:
    tok = _tokenizer(toy_folder)
    sep = separator_for(tok)
    assert (sep.head, sep.tail) == (tok.bos_token_id, tok.eos_token_id)
    doc = DocEncoder(tok, assistant_only=False).encode([TextRecord("A short plain document.")])[0]
    body = tok("A short plain document.", add_special_tokens=False)["input_ids"]
    assert list(doc.ids) == [tok.bos_token_id, *body, tok.eos_token_id] and doc.mask is None


def test_instruct_tokenizer_gets_end_of_text_not_chat_markers(toy_folder: Path) -> None:
    tok = _instruct(toy_folder)
    sep = separator_for(tok)
    assert sep.head is None and sep.tail == tok.convert_tokens_to_ids("<|endoftext|>")
    assert "'<|im_end|>' is a chat marker" in sep.why
    doc = DocEncoder(tok, assistant_only=False).encode([TextRecord("Plain text, no conversation.")])[0]
    markers = set(tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    assert not markers & set(doc.ids.tolist()) and int(doc.ids[-1]) == sep.tail


def test_evaluation_does_not_score_the_separator(toy_folder: Path) -> None:
    tok = _tokenizer(toy_folder)
    train = DocEncoder(tok, assistant_only=False)
    scoring = train.for_evaluation()
    record = TextRecord("Only the data is scored.")
    a, b = train.encode([record])[0], scoring.encode([record])[0]
    assert np.array_equal(a.ids, b.ids)
    assert b.mask is not None
    assert not b.mask[0] and not b.mask[-1] and b.mask[1:-1].all()


def test_shard_key_changes_with_the_separator(toy_folder: Path) -> None:
    plain, instruct = _tokenizer(toy_folder), _instruct(toy_folder)
    instruct_as_plain = _instruct(toy_folder)
    instruct_as_plain.bos_token, instruct_as_plain.eos_token = "<s>", "</s>"
    # Same vocabulary and template: only the separator (and its scoring) differs.
    a = encoding_fingerprint(DocEncoder(instruct, False), 1 << 20)
    b = encoding_fingerprint(DocEncoder(instruct_as_plain, False), 1 << 20)
    c = encoding_fingerprint(DocEncoder(instruct, False).for_evaluation(), 1 << 20)
    assert len({a, b, c}) == 3
    assert DocEncoder(plain, False).separator != DocEncoder(instruct, False).separator


def test_choose_separator_rules() -> None:
    llama3 = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2, "hi": 3}
    template = "{{ bos_token }}<|start_header_id|>user<|end_header_id|>{{ m }}<|eot_id|>"
    sep = choose_separator("<|begin_of_text|>", "<|eot_id|>", llama3, template)
    assert (sep.head, sep.tail) == (0, 1)
    base = choose_separator("<|endoftext|>", "<|endoftext|>", {"<|endoftext|>": 7}, None)
    assert (base.head, base.tail) == (None, 7)
    assert is_chat_marker("<|turn|>", "<|turn|>{{ m }}") and not is_chat_marker("</s>", "{{ m }}</s>")
    with pytest.raises(ModelError, match=r"'<\|im_end\|>' is a chat marker.*no end-of-text token"):
        choose_separator("<|im_start|>", "<|im_end|>", {"<|im_start|>": 0, "<|im_end|>": 1}, None)
    with pytest.raises(ModelError, match="no EOS token"):
        choose_separator(None, None, {"a": 0}, None)


@pytest.mark.slow
def test_smollm2_instruct_separates_with_endoftext() -> None:
    from forge_dev.realmodel import build_real_model

    tok = _tokenizer(build_real_model().folder)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    sep = separator_for(tok)
    assert sep.head is None and sep.tail == tok.convert_tokens_to_ids("<|endoftext|>")
    doc = DocEncoder(tok, assistant_only=False).for_evaluation().encode([TextRecord("The river was high.")])[0]
    assert int(doc.ids[-1]) == sep.tail and doc.mask is not None and not doc.mask[-1] and doc.mask[:-1].all()
