"""One source as an endless stream of packed sequences, with an exact, small, resumable state.

Documents are concatenated and cut into sequences of exactly ``seq_len`` tokens; a document may span sequences.
The state between two sequences is only: the position of the document under the cursor, the cursor, and
counters. Resuming re-reads that one document (S3 range request or seek) and continues at the same token.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from forge_trainer.data.encode import Doc, DocEncoder, Encoded, IdArray, MaskArray
from forge_trainer.data.holdout import HoldOut
from forge_trainer.data.records import DEFAULT_MAX_RECORD_BYTES, BadLine, EpochEnd, Item, Located, Position
from forge_trainer.data.shards import ShardItem, ShardReader, iter_shards
from forge_trainer.data.sources import SourceFiles, iter_source
from forge_trainer.errors import DataError


class Sequence(NamedTuple):
    """``seq_len`` packed tokens, their loss mask (None: every token), and each token's position in its document
    fragment: 0 where a document (or this sequence, or the padding) starts, so that attention can be confined to
    documents (transformers builds a block-causal mask, or a varlen kernel's boundaries, from such position ids)."""

    ids: IdArray
    mask: MaskArray | None
    positions: IdArray


def fragment_positions(lengths: list[int]) -> IdArray:
    """Positions that restart at 0 at the start of every fragment: [3, 2] -> [0, 1, 2, 0, 1]."""
    if len(lengths) == 1:
        return np.arange(lengths[0], dtype=np.int32)
    return np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])


class SourceExhaustedError(Exception):
    """A single-pass source has no more documents."""


@dataclass
class SourceCounters:
    """What a source has given so far (saved with the data state)."""

    epoch: int = 0
    epoch0_tokens: int = 0
    epoch0_docs: int = 0
    pass_tokens: int | None = None
    consumed_tokens: int = 0
    loss_tokens: int = 0
    sequences: int = 0
    bad_lines: int = 0
    docs: int = 0


@dataclass
class SourceState:
    """Resumable state of a PackedSource: JSON-friendly."""

    doc: Position | None = None
    cursor: int = 0
    counters: SourceCounters = field(default_factory=SourceCounters)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> SourceState:
        """Inverse of to_json."""
        doc = data.get("doc")
        return SourceState(
            doc=Position(**doc) if doc else None,
            cursor=int(data["cursor"]),
            counters=SourceCounters(**data["counters"]),
        )


log = logging.getLogger(__name__)

# Bad records named one by one in the log, per source and process; later ones are only counted.
BAD_LINES_LOGGED = 20

_Queued = Located | BadLine | EpochEnd


@dataclass(frozen=True)
class SourceLimits:
    """Per-source limits from the data config."""

    max_repetition: float = 4.0
    max_bad_lines: int = 100
    single_pass: bool = False
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


class PackedSource:
    """Packs one source's documents into fixed-length sequences.

    Documents come from the source's files through the tokenizer, or with ``shards`` (one per file, in the order
    of ``files``) from prepared token shards: the same documents, positions and bad records, tokenised once.
    With ``hold_out`` only one side of the hash split is read (data/holdout.py): the other side's documents are
    skipped as if they were not in the files.
    """

    def __init__(
        self,
        files: SourceFiles,
        source_id: str,
        encoder: DocEncoder,
        seq_len: int,
        seed: int,
        limits: SourceLimits,
        state: SourceState | None = None,
        batch_docs: int = 64,
        shards: Seq[ShardReader] | None = None,
        hold_out: HoldOut | None = None,
    ) -> None:
        self.files = files
        self.hold_out = hold_out
        self.source_id = source_id
        self.encoder = encoder
        self.seq_len = seq_len
        self.limits = limits
        self.batch_docs = batch_docs
        st = state or SourceState()
        self.counters = SourceCounters(**asdict(st.counters))
        self._items: deque[ShardItem] = deque()
        self._reader: Iterator[Item] = iter_source(files, seed, source_id, st.doc, limits.max_record_bytes)
        self._shard_items: Iterator[ShardItem] | None = None
        if shards is not None:
            self._shard_items = iter_shards(files, shards, seed, source_id, st.doc)
        self._doc: Doc | None = None
        self._doc_pos: Position | None = None
        self._cursor = 0
        self._exhausted = False
        if st.doc is not None:
            self._restore(st)

    @property
    def uri(self) -> str:
        """The source URI."""
        return self.files.uri

    def _restore(self, st: SourceState) -> None:
        item = self._pop()
        if not (isinstance(item, Encoded) and item.pos == st.doc and isinstance(item.doc, Doc)):
            raise DataError(f"source {self.uri}: cannot resume: the document at {st.doc} changed since the checkpoint")
        self._doc, self._doc_pos, self._cursor = item.doc, item.pos, st.cursor

    def state(self) -> SourceState:
        """A snapshot to resume from exactly this point."""
        return SourceState(self._doc_pos, self._cursor, SourceCounters(**asdict(self.counters)))

    def _fill(self) -> None:
        if self._shard_items is not None:
            for shard_item in self._shard_items:
                self._items.append(shard_item)
                if len(self._items) >= self.batch_docs or isinstance(shard_item, EpochEnd):
                    break
            return
        batch: list[_Queued] = []
        n_records = 0
        for item in self._reader:
            batch.append(item)
            if isinstance(item, Located):
                n_records += 1
            if n_records >= self.batch_docs or isinstance(item, EpochEnd):
                break
        located = [it for it in batch if isinstance(it, Located)]
        docs = iter(self.encoder.encode([it.record for it in located]))
        for it in batch:
            self._items.append(Encoded(it.file, it.pos, next(docs)) if isinstance(it, Located) else it)

    def _pop(self) -> ShardItem:
        if not self._items:
            self._fill()
        return self._items.popleft()

    def _next_doc(self) -> None:
        if self._exhausted:
            raise SourceExhaustedError(self.uri)
        while True:
            item = self._pop()
            if isinstance(item, EpochEnd):
                self._end_epoch(item.epoch)
            elif isinstance(item, BadLine):
                self._bad(item.file, item.line, item.reason, item.epoch)
            elif not isinstance(item.doc, Doc):
                self._bad(item.file, item.pos.line, str(item.doc), item.pos.epoch)
            elif self.hold_out is not None and not self.hold_out.keeps(item.doc.ids):
                continue
            else:
                if item.pos.epoch == 0:
                    self.counters.epoch0_tokens += len(item.doc)
                    self.counters.epoch0_docs += 1
                self.counters.docs += 1
                self._doc, self._doc_pos, self._cursor = item.doc, item.pos, 0
                return

    def _end_epoch(self, epoch: int) -> None:
        c = self.counters
        if epoch == 0:
            if c.epoch0_docs == 0 and self.hold_out is not None:
                raise DataError(
                    f"source {self.uri}: empty source: none of its usable records is among "
                    f"{self.hold_out.describe()} ({len(self.files.files)} file(s), {c.bad_lines} bad records): "
                    "give the held-out sources explicitly (eval.domain/eval.general) or raise eval.holdOutPerMille"
                )
            if c.epoch0_docs == 0:
                raise DataError(
                    f"source {self.uri}: empty source: no usable records in {len(self.files.files)} file(s) "
                    f"({c.bad_lines} bad)"
                )
            c.pass_tokens = c.epoch0_tokens
        if self.limits.single_pass:
            self._exhausted = True
            raise SourceExhaustedError(self.uri)
        c.epoch = epoch + 1

    def _bad(self, file: str, line: int, reason: str, epoch: int) -> None:
        if epoch > 0:
            return  # counted in the first pass already
        self.counters.bad_lines += 1
        if self.counters.bad_lines <= BAD_LINES_LOGGED:
            log.warning(
                "%s:%d: %s: skipped (bad record %d of at most data.maxBadLines=%d in source %s)",
                file,
                line,
                reason,
                self.counters.bad_lines,
                self.limits.max_bad_lines,
                self.uri,
            )
        elif self.counters.bad_lines == BAD_LINES_LOGGED + 1:
            log.warning("source %s: more bad records; the rest are counted, not logged", self.uri)
        if self.counters.bad_lines > self.limits.max_bad_lines:
            raise DataError(
                f"{file}:{line}: {reason} (source {self.uri}: {self.counters.bad_lines} bad records exceed "
                f"data.maxBadLines={self.limits.max_bad_lines})"
            )

    def next_document(self) -> Doc:
        """The next whole document (what the packer would cut from), leaving the packer's cursor after it."""
        self._next_doc()
        assert self._doc is not None
        self._cursor = len(self._doc)
        return self._doc

    def next_sequence(self, pad_id: int = 0) -> Sequence:
        """The next ``seq_len`` tokens. Single-pass sources pad their last sequence (padding has no loss)."""
        ids: list[IdArray] = []
        masks: list[MaskArray | None] = []
        need = self.seq_len
        while need:
            if self._doc is None or self._cursor >= len(self._doc):
                try:
                    self._next_doc()
                except SourceExhaustedError:
                    if not ids:
                        raise
                    ids.append(np.full(need, pad_id, dtype=np.int32))
                    masks.append(np.zeros(need, dtype=np.bool_))
                    self._doc = None
                    break
            doc = self._doc
            assert doc is not None
            take = min(need, len(doc) - self._cursor)
            ids.append(doc.ids[self._cursor : self._cursor + take])
            masks.append(None if doc.mask is None else doc.mask[self._cursor : self._cursor + take])
            self._cursor += take
            need -= take
        return self._emit(ids, masks)

    def _emit(self, ids: list[IdArray], masks: list[MaskArray | None]) -> Sequence:
        seq = ids[0] if len(ids) == 1 else np.concatenate(ids)
        positions = fragment_positions([len(i) for i in ids])
        mask: MaskArray | None = None
        if any(m is not None for m in masks):
            mask = np.concatenate(
                [np.ones(len(i), np.bool_) if m is None else m for i, m in zip(ids, masks, strict=True)]
            )
        c = self.counters
        c.sequences += 1
        c.consumed_tokens += self.seq_len
        c.loss_tokens += self.seq_len if mask is None else int(mask.sum())
        self._check_repetition()
        return Sequence(seq, mask, positions)

    def _check_repetition(self) -> None:
        c = self.counters
        if c.pass_tokens is None:
            return
        if c.consumed_tokens > self.limits.max_repetition * c.pass_tokens:
            raise DataError(
                f"source {self.uri}: insufficient tokens: it holds {c.pass_tokens} tokens per pass and its share "
                f"needs more than data.maxRepetition={self.limits.max_repetition:g} passes "
                f"({c.consumed_tokens} tokens used by sequence {c.sequences})"
            )

    def count_pass_tokens(self) -> int:
        """Tokenise one whole pass and return its token count (checks bad lines and emptiness on the way)."""
        while self.counters.epoch == 0:
            try:
                self._next_doc()
            except SourceExhaustedError:
                break
        assert self.counters.pass_tokens is not None
        return self.counters.pass_tokens
