"""Reading records (documents) from jsonl and txt files, local or on S3, with their exact location."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
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


def iter_file(uri: str, kind: FileKind, epoch: int, file_pos: int, line: int = 1, offset: int = 0) -> Iterator[Item]:
    """Records of one file from (line, offset), as Located or BadLine items. Unreadable files raise DataError."""
    try:
        fh = _open(uri, offset)
    except StorageUnavailableError:
        raise
    except Exception as err:
        raise _read_error(uri, err) from err
    with fh:
        if kind == "txt":
            yield from _iter_txt(fh, uri, epoch, file_pos)
            return
        while True:
            try:
                raw = fh.readline()
            except StorageUnavailableError:
                raise
            except Exception as err:
                raise _read_error(uri, err) from err
            if not raw:
                return
            start, offset = offset, offset + len(raw)
            if raw.strip():
                try:
                    rec = parse_json_record(raw)
                except BadRecordError as bad:
                    yield BadLine(uri, line, str(bad), epoch)
                else:
                    yield Located(rec, uri, Position(epoch, file_pos, line, start))
            line += 1


def _iter_txt(fh: IO[bytes], uri: str, epoch: int, file_pos: int) -> Iterator[Item]:
    try:
        data = fh.read()
    except StorageUnavailableError:
        raise
    except Exception as err:
        raise _read_error(uri, err) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield BadLine(uri, data.count(b"\n", 0, err.start) + 1, "invalid UTF-8", epoch)
        return
    if text.strip():
        yield Located(TextRecord(text), uri, Position(epoch, file_pos, 1, 0))
    else:
        yield BadLine(uri, 1, "empty text file", epoch)
