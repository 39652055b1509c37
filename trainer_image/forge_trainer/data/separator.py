"""The document separator: which tokens Forge puts around a plain-text document, chosen from the tokenizer.

A text record becomes ``[head] text [tail]``. ``tail`` is the model's end-of-text token; ``head`` its
beginning-of-text token, when it has one of its own. Neither may be a chat marker: an instruct model's tokenizer
often names ``<|im_start|>``/``<|im_end|>`` (or Llama-3-Instruct's ``<|eot_id|>``) as BOS/EOS. Wrapping documents in
those makes the base model's loss there far above the rest, any fine-tune learns the pattern (so measured
forgetting drops for that reason alone), and the model learns to end plain text with an end-of-turn marker.

The rule (:func:`choose_separator`, pure):

- a token is a chat marker when it is a known turn marker or appears literally in the chat template, unless it
  is a known document marker (``<s>``, ``</s>``, ``<|endoftext|>``, ``<|begin_of_text|>`` ...);
- ``tail``: the tokenizer's EOS when it is not a chat marker, else the first known end-of-text token in the
  vocabulary; none found is refused (ModelError naming the tokens);
- ``head``: the tokenizer's BOS when it is not a chat marker and differs from ``tail``, else none.

Evaluation does not score these positions (heldout.py); training does (a document ends there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forge_trainer.errors import ModelError

# Tokens models are pretrained with between documents: never chat markers, even when a template names them.
DOCUMENT_ENDS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end▁of▁sentence|>")
DOCUMENT_STARTS = ("<s>", "<bos>", "<|begin_of_text|>", "<|begin▁of▁sentence|>", "<|startoftext|>")
# Turn markers of common chat formats (ChatML, Llama 3, Gemma, Phi-3, Zephyr).
CHAT_MARKERS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)


@dataclass(frozen=True)
class Separator:
    """Token ids Forge adds around a text document (None: nothing there) and why they were chosen."""

    head: int | None
    tail: int
    why: str

    def added_ids(self) -> frozenset[int]:
        """The ids Forge may add."""
        return frozenset(i for i in (self.head, self.tail) if i is not None)


def is_chat_marker(token: str, template: str | None) -> bool:
    """True for a turn marker: a known one, or one written literally in the chat template."""
    if token in DOCUMENT_ENDS or token in DOCUMENT_STARTS:
        return False
    return token in CHAT_MARKERS or bool(template and token in template)


def choose_separator(bos: str | None, eos: str | None, vocab: Mapping[str, int], template: str | None) -> Separator:
    """The separator for a tokenizer's BOS/EOS tokens, vocabulary and chat template (see the module doc)."""
    notes: list[str] = []
    if eos is not None and eos in vocab and not is_chat_marker(eos, template):
        tail_token = eos
        notes.append(f"end: the EOS token {eos!r}")
    else:
        found = next((t for t in DOCUMENT_ENDS if t in vocab), None)
        why_not = "the tokenizer has no EOS token" if eos is None else f"the EOS token {eos!r} is a chat marker"
        if found is None:
            raise ModelError(
                f"no document separator: {why_not} and the vocabulary has no end-of-text token "
                f"(looked for {', '.join(DOCUMENT_ENDS)}); plain-text documents cannot be delimited"
            )
        tail_token = found
        notes.append(f"end: {found!r} ({why_not})")
    head: int | None = None
    if bos is not None and bos in vocab and bos != tail_token and not is_chat_marker(bos, template):
        head = vocab[bos]
        notes.append(f"start: the BOS token {bos!r}")
    elif bos is not None:
        reason = (
            "the end token" if bos == tail_token else "a chat marker" if is_chat_marker(bos, template) else "unknown"
        )
        notes.append(f"start: none (the BOS token {bos!r} is {reason})")
    else:
        notes.append("start: none (no BOS token)")
    return Separator(head, vocab[tail_token], "; ".join(notes))


def separator_for(tokenizer: Any) -> Separator:
    """:func:`choose_separator` for a transformers tokenizer."""
    template = getattr(tokenizer, "chat_template", None) or None
    return choose_separator(tokenizer.bos_token, tokenizer.eos_token, tokenizer.get_vocab(), template)
