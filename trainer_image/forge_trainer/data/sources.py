"""A data source: its files, their order in each pass (seeded), and an endless resumable record stream."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from forge_trainer import storage
from forge_trainer.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    EpochEnd,
    FileKind,
    Item,
    Position,
    file_kind,
    iter_file,
)
from forge_trainer.errors import DataError, StorageUnavailableError


@dataclass(frozen=True)
class SourceFile:
    """One readable file of a source."""

    uri: str
    size: int
    kind: FileKind
    version: str = ""  # changes with the content: S3 ETag or local mtime (keys the token cache)


@dataclass(frozen=True)
class SourceFiles:
    """The files behind a source URI."""

    uri: str
    files: tuple[SourceFile, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of file sizes (compressed size for .gz)."""
        return sum(f.size for f in self.files)


def resolve_source(uri: str) -> SourceFiles:
    """List a source's files; raises DataError if there are none it can read."""
    try:
        listed = storage.list_versions(uri)
    except StorageUnavailableError:
        raise
    except Exception as err:
        detail = storage.describe_error(err.__cause__ or err)
        raise DataError(f"source {uri}: cannot list: {detail}") from err
    files, ignored = [], []
    for file_uri, size, version in listed:
        kind = file_kind(file_uri)
        if kind is None:
            ignored.append(file_uri)
        else:
            files.append(SourceFile(file_uri, size, kind, version))
    if not files:
        detail = f" (ignored, unsupported names: {', '.join(ignored[:5])})" if ignored else ""
        raise DataError(f"source {uri}: empty source: no .jsonl or .txt files{detail}")
    return SourceFiles(uri, tuple(files))


def epoch_order(n_files: int, seed: int, source_id: str, epoch: int) -> list[int]:
    """File order for one pass: a permutation that depends only on (seed, source, pass)."""
    order = list(range(n_files))
    # A string seed is hashed with SHA-512 by `random`: stable across processes and PYTHONHASHSEED.
    random.Random(f"forge:{seed}:{source_id}:{epoch}").shuffle(order)
    return order


def iter_source(
    files: SourceFiles,
    seed: int,
    source_id: str,
    start: Position | None = None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[Item]:
    """Records of the source pass after pass (an EpochEnd after each pass), starting at ``start``."""
    epoch = start.epoch if start else 0
    first = start
    while True:
        order = epoch_order(len(files.files), seed, source_id, epoch)
        begin = first.file_pos if first else 0
        for file_pos in range(begin, len(order)):
            f = files.files[order[file_pos]]
            if first is not None and file_pos == first.file_pos:
                yield from iter_file(f.uri, f.kind, epoch, file_pos, first.line, first.offset, max_record_bytes)
            else:
                yield from iter_file(f.uri, f.kind, epoch, file_pos, max_record_bytes=max_record_bytes)
            first = None
        first = None
        yield EpochEnd(epoch)
        epoch += 1
