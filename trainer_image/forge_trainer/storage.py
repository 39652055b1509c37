"""Local paths and s3:// URIs behind one small interface (boto3; AWS_ENDPOINT_URL selects an S3-compatible store)."""

from __future__ import annotations

import functools
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

S3_SCHEME = "s3://"


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
    cfg = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


def _s3_keys(url: S3Url) -> Iterator[tuple[str, int]]:
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=url.bucket, Prefix=url.key):
        for obj in page.get("Contents", []):
            yield obj["Key"], int(obj["Size"])


def list_files(uri: str) -> list[tuple[str, int]]:
    """All files at or under ``uri`` as (uri, size), sorted by uri. A missing location gives []."""
    if is_s3(uri):
        url = parse_s3(uri)
        items = [(f"{S3_SCHEME}{url.bucket}/{k}", s) for k, s in _s3_keys(url) if not k.endswith("/")]
        if url.key and not url.key.endswith("/"):
            # "s3://b/data" must not match "s3://b/data2/...": keep the exact object or the folder.
            items = [(u, s) for u, s in items if u == uri or u.startswith(uri + "/")]
        return sorted(items)
    path = Path(uri)
    if path.is_file():
        return [(str(path), path.stat().st_size)]
    if path.is_dir():
        return sorted((str(p), p.stat().st_size) for p in path.rglob("*") if p.is_file())
    return []


class _S3Raw(io.RawIOBase):
    """Raw stream over an S3 GetObject body, so io.BufferedReader can give exact lines and byte counts."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._body.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        self._body.close()
        super().close()


def open_read(uri: str, offset: int = 0) -> BinaryIO:
    """Open a file for binary reading from byte ``offset``."""
    if is_s3(uri):
        url = parse_s3(uri)
        kwargs: dict[str, Any] = {"Bucket": url.bucket, "Key": url.key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        body = s3_client().get_object(**kwargs)["Body"]
        return io.BufferedReader(_S3Raw(body), buffer_size=1 << 20)
    fh = open(uri, "rb")  # noqa: SIM115 - returned to the caller
    if offset:
        fh.seek(offset)
    return fh


def read_bytes(uri: str) -> bytes | None:
    """Whole object, or None if it does not exist."""
    if is_s3(uri):
        url = parse_s3(uri)
        client = s3_client()
        try:
            data: bytes = client.get_object(Bucket=url.bucket, Key=url.key)["Body"].read()
            return data
        except client.exceptions.NoSuchKey:
            return None
    path = Path(uri)
    return path.read_bytes() if path.is_file() else None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically (local: temp file + rename; S3 PUTs are atomic)."""
    if is_s3(uri):
        url = parse_s3(uri)
        s3_client().put_object(Bucket=url.bucket, Key=url.key, Body=data)
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
        s3_client().upload_file(str(local), url.bucket, url.key)
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
        s3_client().download_file(url.bucket, url.key, str(tmp))
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
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            s3_client().delete_objects(Bucket=url.bucket, Delete={"Objects": batch})
        return
    shutil.rmtree(uri, ignore_errors=True)


def same_place(a: str, b: str) -> bool:
    """True when two locations are the same local folder (no copy needed)."""
    if is_s3(a) or is_s3(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()
