"""Held-out documents split off the training sources by a hash of each document.

When a held-out group (eval.domain, eval.general) is not given, ``eval.holdOutPerMille`` of the documents of that
group's training sources are held out: evaluation reads only those, training never sees them. A document's side
depends on its token ids alone (BLAKE2b of the little-endian int32 ids, modulo 1000), so it is the same on every
rank, after every restart, with or without token shards, and in every pass and file order; duplicates of a
held-out document are held out too. It does not depend on where the document sits in the stream: the held-out set
is never "the first tokens the run trains on".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from forge_trainer.data.encode import IdArray

PER_MILLE = 1000


def document_bucket(ids: IdArray) -> int:
    """The document's bucket in 0..999: a hash of its token ids."""
    raw = np.ascontiguousarray(ids, dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"forge-holdout").digest(), "little") % PER_MILLE


def is_held_out(ids: IdArray, per_mille: int) -> bool:
    """True when the document is held out at ``per_mille`` (0: never, 1000: always)."""
    if not 0 <= per_mille <= PER_MILLE:
        raise ValueError(f"per_mille must be within 0..{PER_MILLE}, got {per_mille}")
    return document_bucket(ids) < per_mille


@dataclass(frozen=True)
class HoldOut:
    """Which side of the split a source reads: the held-out documents (evaluation) or the rest (training)."""

    per_mille: int
    held_out: bool

    def keeps(self, ids: IdArray) -> bool:
        """True when this side reads the document."""
        return is_held_out(ids, self.per_mille) == self.held_out

    def describe(self) -> str:
        """For messages: which documents this side reads."""
        side = "held out" if self.held_out else "left for training"
        return f"the documents {side} at eval.holdOutPerMille={self.per_mille}"
