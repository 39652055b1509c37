"""Reading records (documents) from jsonl and txt files, local or on S3, with their exact location."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Literal

from forge_trainer import storage
from forge_trainer.errors import DataError, StorageUnavailableError

FileKind = Literal["jsonl", "txt"]


@dataclass(frozen=True)
class TextRecord:
    """A plain document."""

    text: str


@dataclass(frozen=True)
class ChatRecord:
    """A conversation: (role, content) pairs in order."""

    messages: tuple[tuple[str, str], ...]


Record = TextRecord | ChatRecord


@dataclass(frozen=True)
class Position:
    """Where a record starts: pass over the source, index in that pass's file order, line and byte offset."""

    epoch: int
    file_pos: int
    line: int
    offset: int


@dataclass(frozen=True)
class Located:
    """A good record with its file and position."""

    record: Record
    file: str
    pos: Position


@dataclass(frozen=True)
class BadLine:
    """A malformed record, skipped and counted."""

    file: str
    line: int
    reason: str
    epoch: int


@dataclass(frozen=True)
class EpochEnd:
    """The reader finished one pass over every file of the source."""

    epoch: int


Item = Located | BadLine | EpochEnd


class BadRecordError(ValueError):
    """A record that cannot be used; the message says why."""


# A record (a jsonl line or a whole .txt file) longer than this many bytes is a bad record (data.maxRecordBytes).
DEFAULT_MAX_RECORD_BYTES = 64 << 20
# Bytes read at a time while skipping the rest of an oversized line.
_SKIP_CHUNK = 1 << 20


def file_kind(uri: str) -> FileKind | None:
    """The record format of a file by its name (a .gz suffix is transparent); None if unsupported."""
    name = uri.rsplit("/", 1)[-1]
    if name.startswith((".", "_")):
        return None
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    return None


def _parse_messages(raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise BadRecordError("'messages' must be a non-empty list")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise BadRecordError(f"messages[{i}] is not an object")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise BadRecordError(f"messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise BadRecordError(f"messages[{i}].content must be a string")
        out.append((role, content))
    return tuple(out)


def parse_json_record(raw: bytes) -> Record:
    """One jsonl line -> record; raises BadRecordError with the reason."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRecordError("invalid UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadRecordError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise BadRecordError("a record must be a JSON object")
    has_text, has_messages = "text" in obj, "messages" in obj
    if has_text and has_messages:
        raise BadRecordError("a record has both 'text' and 'messages'")
    if has_messages:
        return ChatRecord(_parse_messages(obj["messages"]))
    if has_text:
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise BadRecordError("'text' must be a non-empty string")
        return TextRecord(text)
    raise BadRecordError("a record needs 'text' or 'messages'")


def _open(uri: str, offset: int) -> IO[bytes]:
    if uri.endswith(".gz"):
        # Offsets of compressed files count decompressed bytes: skip by reading.
        fh: IO[bytes] = gzip.GzipFile(fileobj=storage.open_read(uri), mode="rb")  # type: ignore[assignment]
        remaining = offset
        while remaining > 0:
            chunk = fh.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        return fh
    return storage.open_read(uri, offset)


def _read_error(uri: str, err: Exception) -> DataError:
    return DataError(f"{uri}: cannot read: {type(err).__name__}: {err}")


def iter_file(
    uri: str,
    kind: FileKind,
    epoch: int,
    file_pos: int,
    line: int = 1,
    offset: int = 0,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[Item]:
    """Records of one file from (line, offset), as Located or BadLine items. Unreadable files raise DataError.

    No record is read into memory beyond ``max_record_bytes``: a longer jsonl line (newline excluded) or .txt file
    is a bad record, skipped in bounded chunks.
    """
    try:
        fh = _open(uri, offset)
    except StorageUnavailableError:
        raise
    except Exception as err:
        raise _read_error(uri, err) from err
    with fh:
        if kind == "txt":
            yield from _iter_txt(fh, uri, epoch, file_pos, max_record_bytes)
            return
        while True:
            raw = _read(uri, lambda: fh.readline(max_record_bytes + 1))
            if not raw:
                return
            start, offset = offset, offset + len(raw)
            if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
                offset += _skip_line(uri, fh)
                yield BadLine(uri, line, f"line longer than data.maxRecordBytes={max_record_bytes} bytes", epoch)
            elif raw.strip():
                try:
                    rec = parse_json_record(raw)
                except BadRecordError as bad:
                    yield BadLine(uri, line, str(bad), epoch)
                else:
                    yield Located(rec, uri, Position(epoch, file_pos, line, start))
            line += 1


def _read(uri: str, op: Callable[[], bytes]) -> bytes:
    try:
        return op()
    except StorageUnavailableError:
        raise
    except Exception as err:
        raise _read_error(uri, err) from err


def _skip_line(uri: str, fh: IO[bytes]) -> int:
    """Read past the end of the current line in bounded chunks; returns the bytes skipped (newline included)."""
    skipped = 0
    while True:
        chunk = _read(uri, lambda: fh.readline(_SKIP_CHUNK))
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _iter_txt(fh: IO[bytes], uri: str, epoch: int, file_pos: int, max_record_bytes: int) -> Iterator[Item]:
    data = _read(uri, lambda: fh.read(max_record_bytes + 1))
    if len(data) > max_record_bytes:
        yield BadLine(uri, 1, f"text file larger than data.maxRecordBytes={max_record_bytes} bytes", epoch)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield BadLine(uri, data.count(b"\n", 0, err.start) + 1, "invalid UTF-8", epoch)
        return
    if text.strip():
        yield Located(TextRecord(text), uri, Position(epoch, file_pos, 1, 0))
    else:
        yield BadLine(uri, 1, "empty text file", epoch)
