"""Token shards: every training file tokenised once, stored under a key of its content and the encoding, and read
through memory maps.

One cache entry per file, ``<cache>/<key>/``:

- ``tokens.bin``: the token ids of the file's documents, concatenated (uint16, or uint32 for vocabularies over 65536);
- ``docs.bin``: int64 ``[documents, 4]``: first token, line, byte offset, first byte in ``mask.bin`` (-1: no mask);
- ``mask.bin``: uint8 loss masks of the documents that have one (SFT chat records), concatenated;
- ``manifest.json``: written last, the commit marker: counts, the file it came from, its bad records. An entry
  without a manifest, or whose files disagree with it, is incomplete and is rebuilt.

The key hashes the file (URI, size, version: S3 ETag or local mtime) and the encoding (the tokenizer's full
serialisation, the document separator of data/separator.py and whether it is scored, chat template, SFT masking,
the fallback chat format's version, data.maxRecordBytes). The sequence length is not in it: shards hold whole
documents, packing happens when they are read.

A shard yields exactly the items the tokenising reader would (documents with their positions, bad records in line
order), so the mixer's stream, its determinism and its resume are the same with or without shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from forge_trainer import storage
from forge_trainer.data.encode import FALLBACK_FORMAT, Doc, DocEncoder, Encoded
from forge_trainer.data.records import BadLine, EpochEnd, Located, Position, iter_file
from forge_trainer.data.sources import SourceFile, SourceFiles, epoch_order
from forge_trainer.errors import DataError

log = logging.getLogger(__name__)

# Bump when the shard layout or what encode.py produces for a record changes: old entries are then not found.
FORMAT = 2
MANIFEST = "manifest.json"
TOKENS, DOCS, MASK = "tokens.bin", "docs.bin", "mask.bin"
_DOC_COLUMNS = 4
_BATCH_RECORDS = 256

ShardItem = Encoded | BadLine | EpochEnd
Gather = Callable[[Any], list[Any]]


def encoding_fingerprint(encoder: DocEncoder, max_record_bytes: int) -> str:
    """Everything besides the file that decides the tokens, masks and bad records of a shard."""
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    serialised: str = backend.to_str() if backend is not None else type(encoder.tokenizer).__name__
    desc = {
        "format": FORMAT,
        "tokenizer": hashlib.sha256(serialised.encode()).hexdigest(),
        "vocab": len(encoder.tokenizer),
        "separator": [encoder.separator.head, encoder.separator.tail],
        "scoreSeparators": encoder.score_separators,
        "chatTemplate": encoder.template,
        "assistantOnly": encoder.assistant_only,
        "fallbackFormat": FALLBACK_FORMAT,
        "maxRecordBytes": max_record_bytes,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def shard_key(file: SourceFile, encoding: str) -> str:
    """The cache key of one file's shard."""
    desc = {"uri": file.uri, "size": file.size, "version": file.version, "kind": file.kind, "encoding": encoding}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def token_dtype(vocab: int) -> str:
    """The narrowest unsigned type that holds every token id."""
    return "uint16" if vocab <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class ShardManifest:
    """What a complete cache entry holds (manifest.json)."""

    key: str
    uri: str
    size: int
    version: str
    encoding: str
    dtype: str
    tokens: int
    docs: int
    mask_bytes: int
    bad: list[tuple[int, str]] = field(default_factory=list)
    format: int = FORMAT

    def file_sizes(self) -> dict[str, int]:
        """Expected byte size of each data file."""
        return {
            TOKENS: self.tokens * np.dtype(self.dtype).itemsize,
            DOCS: self.docs * _DOC_COLUMNS * 8,
            MASK: self.mask_bytes,
        }

    def to_json(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @staticmethod
    def from_json(data: Any) -> ShardManifest:
        """Parse and type-check a manifest; raises ValueError when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            m = ShardManifest(
                key=str(data["key"]),
                uri=str(data["uri"]),
                size=int(data["size"]),
                version=str(data["version"]),
                encoding=str(data["encoding"]),
                dtype=str(data["dtype"]),
                tokens=int(data["tokens"]),
                docs=int(data["docs"]),
                mask_bytes=int(data["mask_bytes"]),
                bad=[(int(line), str(reason)) for line, reason in data["bad"]],
                format=int(data["format"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed manifest: {type(err).__name__}: {err}") from None
        if m.dtype not in ("uint16", "uint32") or min(m.tokens, m.docs, m.mask_bytes) < 0:
            raise ValueError(f"malformed manifest: dtype {m.dtype}, {m.tokens} tokens, {m.docs} documents")
        return m


@dataclass
class BuildCounts:
    """Tokeniser work of one build."""

    records: int = 0
    tokens: int = 0


def build_shard(
    file: SourceFile, encoder: DocEncoder, key: str, encoding: str, max_record_bytes: int, workdir: Path
) -> tuple[ShardManifest, BuildCounts]:
    """Tokenise one file into shard files in ``workdir`` (streamed: memory stays bounded by a batch of records)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(encoder.tokenizer))
    limit = np.iinfo(dtype).max
    counts = BuildCounts()
    bad: list[tuple[int, str]] = []
    n_tokens = n_docs = n_mask = 0
    with open(workdir / TOKENS, "wb") as tok_f, open(workdir / DOCS, "wb") as doc_f, open(workdir / MASK, "wb") as m_f:

        def flush(batch: list[Located]) -> None:
            nonlocal n_tokens, n_docs, n_mask
            docs = encoder.encode([it.record for it in batch])
            counts.records += len(batch)
            rows: list[tuple[int, int, int, int]] = []
            for it, doc in zip(batch, docs, strict=True):
                if not isinstance(doc, Doc):
                    bad.append((it.pos.line, str(doc)))
                    continue
                if len(doc) and int(doc.ids.max()) > limit:
                    raise DataError(f"{file.uri}:{it.pos.line}: token id {int(doc.ids.max())} does not fit {dtype}")
                mask_at = -1
                if doc.mask is not None:
                    mask_at = n_mask
                    _write(m_f, doc.mask.astype(np.uint8))
                    n_mask += len(doc)
                rows.append((n_tokens, it.pos.line, it.pos.offset, mask_at))
                _write(tok_f, doc.ids.astype(dtype))
                n_tokens += len(doc)
                counts.tokens += len(doc)
            if rows:
                _write(doc_f, np.asarray(rows, dtype=np.int64))
                n_docs += len(rows)

        batch: list[Located] = []
        for item in iter_file(file.uri, file.kind, 0, 0, max_record_bytes=max_record_bytes):
            if isinstance(item, BadLine):
                bad.append((item.line, item.reason))
            elif isinstance(item, Located):
                batch.append(item)
                if len(batch) >= _BATCH_RECORDS:
                    flush(batch)
                    batch = []
        flush(batch)
    bad.sort()
    manifest = ShardManifest(key, file.uri, file.size, file.version, encoding, dtype, n_tokens, n_docs, n_mask, bad)
    return manifest, counts


def _write(fh: IO[bytes], arr: npt.NDArray[Any]) -> None:
    fh.write(np.ascontiguousarray(arr).tobytes())


class ShardCache:
    """A cache location (local folder or S3 prefix) and the node-local folder S3 shards are copied to."""

    def __init__(self, uri: str, local_root: Path) -> None:
        self.uri = uri
        self.local_root = local_root

    def entry(self, key: str) -> str:
        """The URI of one entry."""
        return storage.join(self.uri, key)

    def load(self, file: SourceFile, key: str, encoding: str) -> ShardManifest | None:
        """The entry's manifest if the entry is complete; None when it is absent, partial or corrupt (then it is
        rebuilt). A read error raises (StorageError / StorageUnavailableError after retries): it is not absence."""
        entry = self.entry(key)
        raw = storage.read_bytes(storage.join(entry, MANIFEST))
        if raw is None:
            return None
        try:
            m = ShardManifest.from_json(json.loads(raw))
        except ValueError as err:
            log.warning("token shard %s (%s): %s: rebuilding it", entry, file.uri, err)
            return None
        expect = (key, file.uri, file.size, file.version, encoding, FORMAT)
        if (m.key, m.uri, m.size, m.version, m.encoding, m.format) != expect:
            log.warning(
                "token shard %s (%s): its manifest is for another file or encoding: rebuilding it", entry, file.uri
            )
            return None
        found = {u.rsplit("/", 1)[-1]: s for u, s in storage.list_files(entry)}
        for name, size in m.file_sizes().items():
            if found.get(name) != size:
                log.warning(
                    "token shard %s (%s): %s has %s bytes, its manifest says %d: rebuilding it",
                    entry,
                    file.uri,
                    name,
                    found.get(name, "no"),
                    size,
                )
                return None
        return m

    def publish(self, workdir: Path, manifest: ShardManifest) -> None:
        """Commit built files: data files first, the manifest last (so a crash leaves no entry that looks complete).
        For an S3 cache the built files become this node's local copy."""
        entry = self.entry(manifest.key)
        if storage.is_s3(self.uri):
            for name in manifest.file_sizes():
                storage.upload(workdir / name, storage.join(entry, name))
            local = self.local_root / manifest.key
            shutil.rmtree(local, ignore_errors=True)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(workdir, local)
        else:
            dest = Path(entry)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / MANIFEST).unlink(missing_ok=True)  # a corrupt entry being rebuilt is never complete meanwhile
            for name in manifest.file_sizes():
                os.replace(workdir / name, dest / name)
            shutil.rmtree(workdir, ignore_errors=True)
        storage.write_bytes(storage.join(entry, MANIFEST), json.dumps(manifest.to_json()).encode())

    def workdir(self, key: str) -> Path:
        """Where a shard is built: beside its entry for a local cache (the commit is a rename), else local scratch."""
        base = Path(self.uri) if not storage.is_s3(self.uri) else self.local_root
        return base / f".build-{key}-{os.getpid()}"


class ShardReader:
    """One complete shard, opened (copied to local disk first for S3) on first use and read through memory maps."""

    def __init__(self, cache: ShardCache, manifest: ShardManifest) -> None:
        self.cache = cache
        self.manifest = manifest
        self._arrays: tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.uint8]] | None = None

    def _folder(self) -> Path:
        m, entry = self.manifest, self.cache.entry(self.manifest.key)
        if not storage.is_s3(self.cache.uri):
            return Path(entry)
        folder = self.cache.local_root / m.key
        for name, size in m.file_sizes().items():
            local = folder / name
            if not (local.is_file() and local.stat().st_size == size):
                storage.download(storage.join(entry, name), local)
        return folder

    def arrays(self) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """Tokens, the document table and the masks (memory-mapped)."""
        if self._arrays is None:
            folder, m = self._folder(), self.manifest
            for name, size in m.file_sizes().items():
                found = (folder / name).stat().st_size if (folder / name).is_file() else None
                if found != size:
                    raise DataError(
                        f"token shard {self.cache.entry(m.key)} ({m.uri}): {folder / name} has {found} bytes, its "
                        f"manifest says {size}: remove the entry to have it rebuilt"
                    )
            self._arrays = (
                _map(folder / TOKENS, np.dtype(m.dtype), (m.tokens,)),
                _map(folder / DOCS, np.dtype(np.int64), (m.docs, _DOC_COLUMNS)),
                _map(folder / MASK, np.dtype(np.uint8), (m.mask_bytes,)),
            )
        return self._arrays

    def items(self, uri: str, epoch: int, file_pos: int, from_line: int = 1) -> Iterator[ShardItem]:
        """The file's documents and bad records from ``from_line`` on, in line order, as the reader gives them."""
        tokens, docs, masks = self.arrays()
        bad = self.manifest.bad
        lines = docs[:, 1]
        i = int(np.searchsorted(lines, from_line))
        j = next((k for k, (line, _) in enumerate(bad) if line >= from_line), len(bad))
        n = len(docs)
        while i < n:
            start, line, offset, mask_at = (int(v) for v in docs[i])
            while j < len(bad) and bad[j][0] < line:
                yield BadLine(uri, bad[j][0], bad[j][1], epoch)
                j += 1
            end = int(docs[i + 1, 0]) if i + 1 < n else len(tokens)
            ids = np.asarray(tokens[start:end], dtype=np.int32)
            mask = None if mask_at < 0 else np.asarray(masks[mask_at : mask_at + end - start], dtype=np.bool_)
            yield Encoded(uri, Position(epoch, file_pos, line, offset), Doc(ids, mask))
            i += 1
        for line, reason in bad[j:]:
            yield BadLine(uri, line, reason, epoch)


def _map(path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    if 0 in shape:
        return np.zeros(shape, dtype=dtype)  # a memmap of zero bytes is not allowed
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def iter_shards(
    files: SourceFiles, shards: Sequence[ShardReader], seed: int, source_id: str, start: Position | None = None
) -> Iterator[ShardItem]:
    """The source pass after pass from its shards (``shards[i]`` is ``files.files[i]``'s), as iter_source would
    read and the encoder tokenise it; resuming at ``start`` finds its document by a binary search on lines."""
    epoch = start.epoch if start else 0
    first = start
    while True:
        order = epoch_order(len(files.files), seed, source_id, epoch)
        for file_pos in range(first.file_pos if first else 0, len(order)):
            at = order[file_pos]
            from_line = first.line if first is not None and file_pos == first.file_pos else 1
            yield from shards[at].items(files.files[at].uri, epoch, file_pos, from_line)
            first = None
        first = None
        yield EpochEnd(epoch)
        epoch += 1


def assign(sizes: Sequence[int], world: int) -> list[int]:
    """The rank that prepares each file: largest first, each to the least loaded rank (ties: lowest rank)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += max(sizes[i], 1)
    return owner


@dataclass
class PrepareStats:
    """What one rank did in the preparation phase."""

    files: int = 0
    reused: int = 0
    built: int = 0
    records: int = 0
    tokens: int = 0

    def add(self, other: PrepareStats) -> None:
        """Sum another rank's figures into this one."""
        for name in ("files", "reused", "built", "records", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class ShardIndex:
    """Every prepared shard by key, and the encoding they were built with."""

    encoding: str
    readers: dict[str, ShardReader]

    def for_source(self, files: SourceFiles) -> list[ShardReader] | None:
        """The shards of a source's files in order; None if one is missing (a file that changed since preparation:
        that source is then tokenised while it streams)."""
        keys = [shard_key(f, self.encoding) for f in files.files]
        if not all(k in self.readers for k in keys):
            return None
        return [self.readers[k] for k in keys]


def prepare(
    files: Sequence[SourceFile],
    encoder: DocEncoder,
    cache: ShardCache,
    max_record_bytes: int,
    rank: int,
    world: int,
    gather: Gather,
) -> tuple[ShardIndex, list[PrepareStats]]:
    """The preparation phase, on every rank: each prepares its share of the files (reused when complete, else
    tokenised and committed), then the ranks exchange manifests. Returns the index and every rank's figures."""
    encoding = encoding_fingerprint(encoder, max_record_bytes)
    unique = {shard_key(f, encoding): f for f in files}
    keys = sorted(unique)
    owner = assign([unique[k].size for k in keys], world)
    stats = PrepareStats()
    mine: list[ShardManifest] = []
    for key, r in zip(keys, owner, strict=True):
        if r != rank:
            continue
        file = unique[key]
        stats.files += 1
        manifest = cache.load(file, key, encoding)
        if manifest is not None:
            stats.reused += 1
        else:
            workdir = cache.workdir(key)
            shutil.rmtree(workdir, ignore_errors=True)
            manifest, counts = build_shard(file, encoder, key, encoding, max_record_bytes, workdir)
            cache.publish(workdir, manifest)
            stats.built += 1
            stats.records += counts.records
            stats.tokens += counts.tokens
            log.info("token shard %s: %s: %d documents, %d tokens", key, file.uri, manifest.docs, manifest.tokens)
        mine.append(manifest)
    everyone: list[tuple[list[ShardManifest], PrepareStats]] = gather((mine, stats))
    readers = {m.key: ShardReader(cache, m) for ms, _ in everyone for m in ms}
    return ShardIndex(encoding, readers), [s for _, s in everyone]
