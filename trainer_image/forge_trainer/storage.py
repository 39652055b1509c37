"""Local paths and s3:// URIs behind one small interface (boto3; AWS_ENDPOINT_URL selects an S3-compatible store).

Every S3 call retries transient faults (refused or dropped connections, timeouts, 5xx, throttling) with exponential
back-off for up to ``FORGE_STORAGE_RETRY_SECONDS`` (default 300) before it raises ``StorageUnavailableError``
(a retryable exit code); boto3's own "standard" retries run inside each attempt. Answers that another attempt
cannot change (no such bucket, access denied) raise ``StorageError`` at once. A missing object is ``None`` or
``[]``, never an error, and an error is never taken for a missing object. Streams re-open with a ranged GET at the
byte they had reached when a connection drops.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from forge_trainer.errors import StorageError, StorageUnavailableError

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
RETRY_SECONDS_ENV = "FORGE_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
READ_TIMEOUT_ENV = "FORGE_S3_READ_TIMEOUT_SECONDS"
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 10.0

# S3 error codes that no retry can change.
PERMANENT_S3_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "NoSuchKey",
        "SignatureDoesNotMatch",
        "AccountProblem",
        "InvalidObjectState",
    }
)

T = TypeVar("T")


def retry_seconds() -> float:
    """How long one storage operation keeps retrying transient faults."""
    raw = os.environ.get(RETRY_SECONDS_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS


def is_transient(err: BaseException) -> bool:
    """True for faults another attempt may not meet: transport errors, timeouts, 5xx, throttling."""
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as bce

    if isinstance(err, bce.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in PERMANENT_S3_CODES:
            return False
        return not isinstance(status, int) or status >= 500 or status in (408, 429) or "Throttl" in code
    if isinstance(err, S3UploadFailedError):  # s3transfer wraps the ClientError's text
        return not any(code in str(err) for code in PERMANENT_S3_CODES)
    transient_types: tuple[type[BaseException], ...] = (
        bce.EndpointConnectionError,
        bce.ConnectionClosedError,
        bce.ConnectTimeoutError,
        bce.ReadTimeoutError,
        bce.ResponseStreamingError,
        bce.IncompleteReadError,
        bce.HTTPClientError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(err, transient_types):
        return True
    if type(err).__name__ == "RetriesExceededError":  # s3transfer's, after its own download retries
        return True
    import urllib3.exceptions

    return isinstance(err, urllib3.exceptions.HTTPError)


def describe_error(err: BaseException) -> str:
    """'NoSuchBucket (The specified bucket does not exist)' for an S3 error answer, 'Kind: text' for the rest."""
    from botocore import exceptions as bce

    if isinstance(err, bce.ClientError):
        error = err.response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        if code:
            return f"{code} ({message})" if message else str(code)
    return f"{type(err).__name__}: {err}"


def with_retries(op: Callable[[], T], what: str, deadline_s: float | None = None) -> T:
    """Run ``op``; retry transient faults with exponential back-off until ``deadline_s`` (default retry_seconds()).

    Raises StorageUnavailableError when the faults outlive the deadline, StorageError for a permanent refusal.
    """
    budget = retry_seconds() if deadline_s is None else deadline_s
    started = time.monotonic()
    delay = _FIRST_DELAY_S
    attempts = 0
    while True:
        try:
            return op()
        except StorageError:
            raise
        except Exception as err:
            attempts += 1
            if not is_transient(err):
                raise StorageError(f"{what}: {describe_error(err)}") from err
            elapsed = time.monotonic() - started
            if elapsed + delay > budget:
                raise StorageUnavailableError(
                    f"{what}: storage still failing after {attempts} attempts in {elapsed:.0f}s "
                    f"({RETRY_SECONDS_ENV}={budget:g}): {type(err).__name__}: {err}"
                ) from err
            if attempts == 1 or attempts % 5 == 0:
                log.warning("%s: %s: %s; retrying (attempt %d)", what, type(err).__name__, err, attempts + 1)
            time.sleep(delay)
            delay = min(_MAX_DELAY_S, delay * 2)


@dataclass(frozen=True)
class S3Url:
    """An s3://bucket/key location (key may be a prefix)."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith(S3_SCHEME)


def parse_s3(uri: str) -> S3Url:
    """Split s3://bucket/key; raises ValueError without a bucket."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket in S3 URI")
    return S3Url(bucket, key)


def join(base: str, *parts: str) -> str:
    """Join URI or path segments with '/'."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@functools.lru_cache(maxsize=1)
def s3_client() -> Any:
    """A boto3 S3 client; AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL points it at an S3-compatible server."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    read_timeout = float(os.environ.get(READ_TIMEOUT_ENV, "60"))
    cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=read_timeout)
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


def _s3_objects(url: S3Url) -> list[tuple[str, int, str]]:
    def listing() -> list[tuple[str, int, str]]:
        paginator = s3_client().get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=url.bucket, Prefix=url.key):
            out += [(obj["Key"], int(obj["Size"]), str(obj.get("ETag", ""))) for obj in page.get("Contents", [])]
        return out

    return with_retries(listing, f"list {url}")


def _s3_keys(url: S3Url) -> list[tuple[str, int]]:
    return [(k, s) for k, s, _ in _s3_objects(url)]


def list_folders(uri: str) -> list[str]:
    """Names of the folders directly under a local folder or S3 prefix (a missing location gives [])."""
    if not is_s3(uri):
        root = Path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    url = parse_s3(uri)
    prefix = url.key.rstrip("/") + "/" if url.key else ""

    def listing() -> list[str]:
        paginator = s3_client().get_paginator("list_objects_v2")
        names: set[str] = set()
        for page in paginator.paginate(Bucket=url.bucket, Prefix=prefix, Delimiter="/"):
            names |= {cp["Prefix"][len(prefix) :].strip("/") for cp in page.get("CommonPrefixes", [])}
        return sorted(names)

    return with_retries(listing, f"list {uri}")


def list_files(uri: str) -> list[tuple[str, int]]:
    """All files at or under ``uri`` as (uri, size), sorted by uri. A missing location gives []."""
    return [(u, s) for u, s, _ in list_versions(uri)]


def list_versions(uri: str) -> list[tuple[str, int, str]]:
    """All files at or under ``uri`` as (uri, size, version), sorted by uri; a missing location gives [].

    The version changes when the content does: the ETag of an S3 object, the modification time (ns) of a local file.
    """
    if is_s3(uri):
        url = parse_s3(uri)
        items = [(f"{S3_SCHEME}{url.bucket}/{k}", s, e) for k, s, e in _s3_objects(url) if not k.endswith("/")]
        if url.key and not url.key.endswith("/"):
            # "s3://b/data" must not match "s3://b/data2/...": keep the exact object or the folder.
            items = [(u, s, e) for u, s, e in items if u == uri or u.startswith(uri + "/")]
        return sorted(items)
    path = Path(uri)
    if path.is_file():
        return [_local_version(path)]
    if path.is_dir():
        return sorted(_local_version(p) for p in path.rglob("*") if p.is_file())
    return []


def _local_version(path: Path) -> tuple[str, int, str]:
    st = path.stat()
    return str(path), st.st_size, f"mtime:{st.st_mtime_ns}"


class _S3Raw(io.RawIOBase):
    """Raw stream over an S3 object from a byte offset, so io.BufferedReader can give exact lines and byte counts.

    A read that fails in a transient way re-opens the object with a ranged GET at the current byte.
    """

    def __init__(self, url: S3Url, offset: int) -> None:
        self._url = url
        self._pos = offset
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def _open(self) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self._url.bucket, "Key": self._url.key}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        return s3_client().get_object(**kwargs)["Body"]

    def _read(self, size: int) -> bytes:
        if self._body is None:
            self._body = self._open()
        try:
            data: bytes = self._body.read(size)
        except Exception:
            self._drop()
            raise
        return data

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception as err:  # the connection is already broken; a fresh GET follows
                log.debug("closing a broken S3 stream: %s", err)

    def readinto(self, b: Any) -> int:
        data = with_retries(lambda: self._read(len(b)), f"read {self._url} at byte {self._pos}")
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(uri: str, offset: int = 0) -> BinaryIO:
    """Open a file for binary reading from byte ``offset``."""
    if is_s3(uri):
        raw = _S3Raw(parse_s3(uri), offset)
        raw._body = with_retries(raw._open, f"open {uri}")  # fail here, not at the first read, if it is missing
        return io.BufferedReader(raw, buffer_size=1 << 20)
    fh = open(uri, "rb")  # noqa: SIM115 - returned to the caller
    if offset:
        fh.seek(offset)
    return fh


def read_bytes(uri: str) -> bytes | None:
    """Whole object, or None if it does not exist (a read error raises: it is not absence)."""
    if is_s3(uri):
        url = parse_s3(uri)

        def read() -> bytes | None:
            client = s3_client()
            try:
                data: bytes = client.get_object(Bucket=url.bucket, Key=url.key)["Body"].read()
            except client.exceptions.NoSuchKey:
                return None
            return data

        return with_retries(read, f"read {uri}")
    path = Path(uri)
    return path.read_bytes() if path.is_file() else None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically (local: temp file + rename; S3 PUTs are atomic)."""
    if is_s3(uri):
        url = parse_s3(uri)
        with_retries(lambda: s3_client().put_object(Bucket=url.bucket, Key=url.key, Body=data), f"write {uri}")
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upload(local: Path, uri: str) -> None:
    """Copy a local file to ``uri`` (S3 uploads are multipart for large files)."""
    if is_s3(uri):
        url = parse_s3(uri)
        with_retries(lambda: s3_client().upload_file(str(local), url.bucket, url.key), f"upload {uri}")
        return
    dest = Path(uri)
    if dest.exists() and dest.resolve() == local.resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def download(uri: str, local: Path) -> None:
    """Copy ``uri`` to a local file atomically (temp name, then rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    if is_s3(uri):
        url = parse_s3(uri)
        with_retries(lambda: s3_client().download_file(url.bucket, url.key, str(tmp)), f"download {uri}")
    else:
        src = Path(uri)
        if src.resolve() == local.resolve():
            return
        shutil.copyfile(src, tmp)
    os.replace(tmp, local)


def delete_tree(uri: str) -> None:
    """Delete everything under a prefix or folder."""
    if is_s3(uri):
        url = parse_s3(uri)
        prefix = url.key.rstrip("/") + "/"
        keys = [k for k, _ in _s3_keys(S3Url(url.bucket, prefix))]
        for i in range(0, len(keys), 1000):
            _delete_keys(url.bucket, keys[i : i + 1000], f"delete under {uri}")
        return
    shutil.rmtree(uri, ignore_errors=True)


def _delete_keys(bucket: str, keys: list[str], what: str) -> None:
    batch = {"Objects": [{"Key": k} for k in keys]}
    with_retries(lambda: s3_client().delete_objects(Bucket=bucket, Delete=batch), what)


def delete_files(uris: list[str]) -> None:
    """Delete single files (missing ones are fine)."""
    for uri in uris:
        if is_s3(uri):
            url = parse_s3(uri)
            _delete_keys(url.bucket, [url.key], f"delete {uri}")
        else:
            Path(uri).unlink(missing_ok=True)


def same_place(a: str, b: str) -> bool:
    """True when two locations are the same local folder (no copy needed)."""
    if is_s3(a) or is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()
