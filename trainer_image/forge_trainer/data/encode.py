"""Records -> token ids (+ loss mask), with the base model's tokenizer.

Text records: [head] text [tail], with the separator chosen from the tokenizer (data/separator.py: the model's
end-of-text token, never a chat marker), loss on every token. With ``score_separators=False`` (held-out evaluation)
the positions Forge added carry no loss: only the data is scored.

Chat records are rendered with the tokenizer's chat template. Under sft and lora only assistant turns carry loss:
each assistant turn's character span is found by rendering the conversation up to the turn with the generation
prompt and up to the end of the turn, and tokens overlapping those spans get loss (so the end-of-turn marker the
template emits after an assistant message is learned too). A template for which these renderings are not prefixes
of the full rendering makes that record bad (counted, reason given).

Without a chat template the documented fallback is used::

    [head]<|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n[tail]

with loss on each assistant "{content}\\n" and on the final [tail] when the last message is the assistant's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from forge_trainer.data.records import BadRecordError, ChatRecord, Position, Record, TextRecord
from forge_trainer.data.separator import Separator, separator_for
from forge_trainer.errors import ModelError

# The fallback chat format's version: part of the token cache key (data/shards), bump it when render_fallback changes.
FALLBACK_FORMAT = 1

IdArray = npt.NDArray[np.int32]
MaskArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Doc:
    """A tokenised record. ``mask`` marks tokens that carry loss; None means every token."""

    ids: IdArray
    mask: MaskArray | None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Encoded:
    """A tokenised record (or why it cannot be used) with its file and position."""

    file: str
    pos: Position
    doc: Doc | BadRecordError


Span = tuple[int, int]


class DocEncoder:
    """Tokenises batches of records; ``assistant_only`` selects the SFT loss mask for chat records;
    ``score_separators=False`` takes the loss off the separator tokens Forge adds (held-out evaluation)."""

    def __init__(self, tokenizer: Any, assistant_only: bool, score_separators: bool = True) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError("the tokenizer must be a fast (Rust) tokenizer: offsets are needed for loss masks")
        self.tokenizer = tokenizer
        self.assistant_only = assistant_only
        self.score_separators = score_separators
        self.separator: Separator = separator_for(tokenizer)
        self.bos: int | None = self.separator.head
        self.eos: int | None = self.separator.tail
        self.template: str | None = getattr(tokenizer, "chat_template", None) or None

    def for_evaluation(self) -> DocEncoder:
        """The same encoding with no loss on the separators Forge adds (same ids, so the same hold-out split)."""
        return DocEncoder(self.tokenizer, self.assistant_only, score_separators=False)

    def encode(self, records: list[Record]) -> list[Doc | BadRecordError]:
        """Tokenise records in one batch; a record that cannot be used becomes a BadRecordError in its slot."""
        out: list[Doc | BadRecordError | None] = [None] * len(records)
        text_idx = [i for i, r in enumerate(records) if isinstance(r, TextRecord)]
        if text_idx:
            texts = [records[i].text for i in text_idx]  # type: ignore[union-attr]
            for i, ids in zip(text_idx, self._ids(texts), strict=True):
                out[i] = Doc(self._wrap(ids, bos=True, eos=True), self._text_mask(len(ids)))
        chats: list[tuple[int, str, list[Span], bool]] = []
        for i, r in enumerate(records):
            if isinstance(r, ChatRecord):
                try:
                    text, spans, templated = self._render(r)
                except BadRecordError as bad:
                    out[i] = bad
                else:
                    chats.append((i, text, spans, templated))
        if chats:
            enc = self.tokenizer([c[1] for c in chats], add_special_tokens=False, return_offsets_mapping=True)
            for (i, _, spans, templated), ids, offs in zip(chats, enc["input_ids"], enc["offset_mapping"], strict=True):
                out[i] = self._chat_doc(ids, offs, spans, templated, records[i])
        return [o for o in out if o is not None]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            # Same ids as tokenizer(texts, add_special_tokens=False), without offsets or Python-side wrapping.
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        ids: list[list[int]] = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return ids

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> IdArray:
        head = [self.bos] if bos and self.bos is not None else []
        tail = [self.eos] if eos and self.eos is not None else []
        return np.asarray(head + ids + tail, dtype=np.int32)

    def _text_mask(self, n: int) -> MaskArray | None:
        """None (every token scored), or, without scored separators, False on the head and tail."""
        if self.score_separators:
            return None
        head = [False] if self.bos is not None else []
        tail = [False] if self.eos is not None else []
        return np.asarray(head + [True] * n + tail, dtype=np.bool_)

    def _chat_doc(
        self, ids: list[int], offs: list[tuple[int, int]], spans: list[Span], templated: bool, rec: Record
    ) -> Doc | BadRecordError:
        wrap = not templated
        arr = self._wrap(ids, bos=wrap, eos=wrap)
        if not self.assistant_only:
            return Doc(arr, None if templated else self._text_mask(len(ids)))
        off = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.bool_)
        for a, b in spans:
            mask |= (off[:, 1] > a) & (off[:, 0] < b)
        if wrap:
            last_is_assistant = isinstance(rec, ChatRecord) and rec.messages[-1][0] == "assistant"
            head = [False] if self.bos is not None else []
            tail = [last_is_assistant and self.score_separators] if self.eos is not None else []
            mask = np.concatenate([np.asarray(head, np.bool_), mask, np.asarray(tail, np.bool_)])
        if not mask.any():
            return BadRecordError("no assistant tokens to train on")
        return Doc(arr, mask)

    def _render(self, rec: ChatRecord) -> tuple[str, list[Span], bool]:
        if self.template is None:
            text, spans = render_fallback(rec)
            return text, spans, False
        full = self._apply(_as_dicts(rec), gen=False)
        return full, self._template_spans(rec, full), True

    def _apply(self, msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            text: str = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as err:
            raise BadRecordError(f"chat template failed: {err}") from None
        return text

    def _template_spans(self, rec: ChatRecord, full: str) -> list[Span]:
        if not self.assistant_only:
            return []
        msgs = _as_dicts(rec)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._apply(msgs[:i], gen=True) if i else ""
            upto = self._apply(msgs[: i + 1], gen=False)
            if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
                raise BadRecordError("the chat template does not render conversations prefix by prefix")
            spans.append((len(before), len(upto)))
        return spans


def _as_dicts(rec: ChatRecord) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in rec.messages]


def render_fallback(rec: ChatRecord) -> tuple[str, list[Span]]:
    """The fallback chat format (no template): text and the character spans of assistant turns."""
    parts: list[str] = []
    spans: list[Span] = []
    pos = 0
    for role, content in rec.messages:
        header, body = f"<|{role}|>\n", f"{content}\n"
        parts.append(header)
        pos += len(header)
        if role == "assistant":
            spans.append((pos, pos + len(body)))
        parts.append(body)
        pos += len(body)
    return "".join(parts), spans
