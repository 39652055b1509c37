"""Storage under real network faults: moto's S3 server behind a loopback relay that is taken down, brought back or
made to drop its connections. A transient fault is retried; one that outlives the retries is StorageUnavailable
(retryable exit code); a permanent refusal is StorageError; and a read error is never taken for a missing object."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_trainer import checkpoint as ckpt
from forge_trainer import storage
from forge_trainer.errors import (
    EXIT_CONFIG,
    EXIT_STORAGE,
    EXIT_STORAGE_UNAVAILABLE,
    ConfigError,
    StorageError,
    StorageUnavailableError,
)
from tests.faults import TcpProxy
from tests.trainer.harness import S3Server
from tests.trainer.test_checkpoint import fake_save, publish


@pytest.fixture
def relay(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """boto3 in this process talks to moto through a relay the test controls; retries give up after 20 s."""
    host, port = s3.endpoint.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    proxy.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "20")
    storage.s3_client.cache_clear()
    try:
        yield proxy
    finally:
        proxy.down()
        storage.s3_client.cache_clear()


def test_a_short_outage_is_retried_for_reads_writes_and_listings(relay: TcpProxy, bucket: str) -> None:
    storage.write_bytes(f"s3://{bucket}/a.txt", b"hello")
    with relay.outage(3.0):
        assert storage.read_bytes(f"s3://{bucket}/a.txt") == b"hello"
    with relay.outage(3.0):
        storage.write_bytes(f"s3://{bucket}/b.txt", b"world")
    with relay.outage(3.0):
        assert [u for u, _ in storage.list_files(f"s3://{bucket}/")] == [f"s3://{bucket}/a.txt", f"s3://{bucket}/b.txt"]
    assert storage.read_bytes(f"s3://{bucket}/b.txt") == b"world"


def test_an_outage_longer_than_the_retries_is_unavailable_not_absent(
    relay: TcpProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.write_bytes(f"s3://{bucket}/a.txt", b"hello")
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "2")
    relay.down()
    with pytest.raises(StorageUnavailableError, match=r"read s3://.*/a\.txt: storage still failing after \d+ attempts"):
        storage.read_bytes(f"s3://{bucket}/a.txt")
    assert StorageUnavailableError.exit_code == EXIT_STORAGE_UNAVAILABLE >= 128  # restartPolicy ExitCode retries it


def test_missing_is_none_and_a_permanent_refusal_is_not_retried(relay: TcpProxy, bucket: str) -> None:
    assert storage.read_bytes(f"s3://{bucket}/nothing-here") is None
    assert storage.list_files(f"s3://{bucket}/nothing-here/") == []
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("s3://no-such-bucket-for-forge/x")
    assert not isinstance(caught.value, StorageUnavailableError)
    assert caught.value.exit_code == EXIT_STORAGE < 128 and "NoSuchBucket" in str(caught.value)


def test_a_stream_reopens_at_its_byte_when_the_connection_drops(relay: TcpProxy, bucket: str) -> None:
    data = os.urandom(3 << 20)
    storage.write_bytes(f"s3://{bucket}/big.bin", data)
    with storage.open_read(f"s3://{bucket}/big.bin", offset=100) as fh:
        head = fh.read(1 << 20)  # the buffered reader holds 1 MiB; the next read goes to the network again
        relay.drop_connections()
        rest = fh.read()
    assert head + rest == data[100:]


def test_a_manifest_read_error_is_not_an_incomplete_checkpoint(
    relay: TcpProxy, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    for step in (20, 40):
        fake_save(places, step)
        publish(places, step)
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "2")
    relay.down()
    with pytest.raises(StorageUnavailableError):
        ckpt.latest_complete(places.output)  # never None: that would send a restarted run back to step 0
    with pytest.raises(StorageUnavailableError):
        ckpt.read_manifest(places.remote(40))
    relay.up()
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "20")
    found = [0]

    def read_during_outage() -> None:
        latest = ckpt.latest_complete(places.output)
        found[0] = -1 if latest is None else int(latest["step"])

    relay.down()
    reader = threading.Thread(target=read_during_outage)
    reader.start()
    threading.Timer(2.0, relay.up).start()
    reader.join(30)
    assert found[0] == 40


def test_resume_downloads_only_what_the_local_rank_needs(relay: TcpProxy, bucket: str, tmp_path: Path) -> None:
    places = ckpt.Places(tmp_path / "local", f"s3://{bucket}/run")
    fake_save(places, 5)
    (places.local(5) / "hf").mkdir()
    (places.local(5) / "hf" / "model.safetensors").write_bytes(b"w" * 500)
    manifest = publish(places, 5)
    node = ckpt.Places(tmp_path / "node-of-rank-1", places.output)
    tag_dir = ckpt.materialise(node, manifest, ranks={1})
    present = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file())
    assert present == [
        "forge-manifest.json",
        "forge/rng_rank_1.pt",
        "forge/state.json",
        "global_step5/mp_rank_00_model_states.pt",
        "global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # every file when no ranks are named (the export command needs all the shards)
    full = ckpt.materialise(node, manifest)
    assert (full / "hf" / "model.safetensors").is_file()
    assert (full / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()


def test_resuming_with_another_world_size_says_so() -> None:
    manifest = {"step": 40, "worldSize": 4}
    ckpt.check_world_size(manifest, 4, "s3://b/run/step-00000040")
    with pytest.raises(ConfigError, match=r"this job has 2 ranks but its latest checkpoint .* by 4"):
        ckpt.check_world_size(manifest, 2, "s3://b/run/step-00000040")
    assert ConfigError.exit_code == EXIT_CONFIG  # permanent: a restart with the same world would fail the same way


def test_the_early_stop_marker_is_not_absent_during_an_outage(
    relay: TcpProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run the guard stopped must not train again because the store was unreachable when it restarted."""
    from forge_trainer.checkpoint_manager import STOP_MARKER, read_stop_marker
    from forge_trainer.config import TrainerConfig

    output = f"s3://{bucket}/stopped/"
    storage.write_bytes(output + STOP_MARKER, b'{"version": 1, "earlyStop": {"reason": "LossDiverged", "step": 9}}')
    cfg = TrainerConfig.model_construct(checkpoints=type("C", (), {"output": output})())
    assert (read_stop_marker(cfg) or {})["earlyStop"]["reason"] == "LossDiverged"
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "2")
    relay.down()
    with pytest.raises(StorageUnavailableError):
        read_stop_marker(cfg)
