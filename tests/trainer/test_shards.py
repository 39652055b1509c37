"""Token shards (data prepared once) and bounded input: the shard stream is the tokenising stream, entries are
reused, split over ranks, rebuilt when partial or corrupt, and a read error is never taken for absence."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest

from forge_trainer import storage, tiny
from forge_trainer.config import TrainerConfig
from forge_trainer.data import shards
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import Layout, MixPlan, build_mixer, plan_mix, prepare_shards, step_batches
from forge_trainer.data.mixer import Mixer
from forge_trainer.data.records import BadLine, Located, iter_file
from forge_trainer.errors import DataError, StorageError
from forge_trainer.model import load_tokenizer
from tests.trainer.conftest import Corpora
from tests.trainer.harness import merged


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)


def make_cfg(base: dict[str, Any], **overrides: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(merged(base, **overrides))


def encoder_for(cfg: TrainerConfig, tokenizer: Any) -> DocEncoder:
    return DocEncoder(tokenizer, assistant_only=cfg.model.technique in ("sft", "lora"))


def alone(obj: Any) -> list[Any]:
    """The gather of a single-rank job."""
    return [obj]


def prepared(cfg: TrainerConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> tuple[MixPlan, shards.PrepareStats]:
    plan = plan_mix(cfg.data)
    index, stats = prepare_shards(plan, cfg, encoder_for(cfg, tokenizer), rank, world, alone)
    return plan_mix(cfg.data, index), stats


def take(mixer: Mixer, n: int) -> list[tuple[int, list[int], list[bool] | None]]:
    out = []
    for _ in range(n):
        s = mixer.next()
        out.append((s.source, s.ids.tolist(), None if s.mask is None else s.mask.tolist()))
    return out


def mixed_sources(tmp_path: Path, corpora: Corpora) -> dict[str, Any]:
    """SFT chat records, a small wrapping source with bad lines, a gz file and a long txt document."""
    small = tiny.write_corpus(tmp_path / "small" / "s.jsonl", "domain", 30, 9)
    with small.open("a") as fh:
        fh.write('{"text": 5}\n\n{"messages": [{"role": "user", "content": "no answer"}]}\nnot json\n')
        fh.write(json.dumps({"text": "after the bad ones"}) + "\n")
    gz = tmp_path / "small" / "t.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.writelines(json.dumps({"text": tiny.domain_text(random.Random(i))}) + "\n" for i in range(20))
    book = tmp_path / "long" / "book.txt"
    book.parent.mkdir()
    book.write_text(" ".join(tiny.domain_text(random.Random(i)) for i in range(60)))
    return {
        "domain": [{"uri": str(small.parent)}, {"uri": str(corpora.chat)}],
        "general": [{"uri": str(book.parent)}],
        "maxRepetition": 50,
        "maxBadLines": 10,
        "tokenCache": str(tmp_path / "cache"),
    }


def test_shards_give_the_tokenising_stream_and_resume_it_exactly(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, tmp_path: Path
) -> None:
    cfg = make_cfg(base_config, model={"technique": "sft"}, data=mixed_sources(tmp_path, corpora))
    enc = encoder_for(cfg, tokenizer)
    streamed = build_mixer(plan_mix(cfg.data), cfg, enc)
    plan, stats = prepared(cfg, tokenizer)
    assert stats.built == stats.files == 4 and stats.reused == 0
    assert all(plan.source_shards(i) is not None for i in range(3))
    mixer = build_mixer(plan, cfg, enc)
    it = step_batches(mixer, plan, cfg, Layout(1, 0, 4, 2), 0)
    ref = step_batches(streamed, plan_mix(cfg.data), cfg, Layout(1, 0, 4, 2), 0)
    for _ in range(7):
        batch, ref_batch = next(it), next(ref)
        assert batch.state == ref_batch.state
        for mb, ref_mb in zip(batch.micro, ref_batch.micro, strict=True):
            assert mb.ids.tolist() == ref_mb.ids.tolist() and mb.labels.tolist() == ref_mb.labels.tolist()
            assert mb.positions is not None and ref_mb.positions is not None
            assert mb.positions.tolist() == ref_mb.positions.tolist()
    saved = json.loads(json.dumps(batch.state))
    expected = take(mixer, 150)
    assert expected == take(streamed, 150)
    assert mixer.report() == streamed.report()
    assert mixer.report()["sources"][0]["badLines"] == 3
    assert any(r["passes"] and r["passes"] > 1 for r in mixer.report()["sources"])
    # Resume from the shards, and across paths: a state of the tokenising stream resumes on shards and back.
    assert take(build_mixer(plan, cfg, enc, saved), 150) == expected
    assert take(build_mixer(plan_mix(cfg.data), cfg, enc, saved), 150) == expected


def test_a_second_preparation_tokenises_nothing(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, tmp_path: Path
) -> None:
    cfg = make_cfg(base_config, data={"tokenCache": str(tmp_path / "cache")})
    _, first = prepared(cfg, tokenizer)
    assert (first.built, first.reused) == (3, 0) and first.tokens > 0
    _, second = prepared(cfg, tokenizer)
    assert (second.built, second.reused, second.tokens, second.records) == (0, 3, 0, 0)
    # Another technique changes the encoding (SFT masks): new entries, the old ones stay.
    _, sft = prepared(make_cfg(cfg.to_json_dict(), model={"technique": "sft"}), tokenizer)
    assert sft.built == 3
    assert len([p for p in (tmp_path / "cache").iterdir() if (p / shards.MANIFEST).is_file()]) == 6
    # A changed file (new content, so a new version) is prepared again, alone.
    path = sorted(corpora.domain.glob("*.jsonl"))[0]
    copy = tmp_path / "domain"
    copy.mkdir()
    for f in corpora.domain.glob("*.jsonl"):
        (copy / f.name).write_bytes(f.read_bytes())
    cfg2 = make_cfg(cfg.to_json_dict(), data={"domain": [{"uri": str(copy)}]})
    _, base = prepared(cfg2, tokenizer)
    with (copy / path.name).open("a") as fh:
        fh.write(json.dumps({"text": "one more ticket"}) + "\n")
    _, again = prepared(cfg2, tokenizer)
    assert (base.built, again.built, again.reused) == (2, 1, 2)


def test_ranks_split_the_files_and_share_the_cache(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, tmp_path: Path
) -> None:
    cfg = make_cfg(base_config, data={"tokenCache": str(tmp_path / "cache")})
    built = [prepared(cfg, tokenizer, rank, 2)[1] for rank in range(2)]
    assert [s.files for s in built] == [1, 2]  # the largest file alone, the two smaller ones together
    _, single = prepared(make_cfg(cfg.to_json_dict(), data={"tokenCache": str(tmp_path / "single")}), tokenizer)
    assert sum(s.built for s in built) == single.built == 3
    assert sum(s.tokens for s in built) == single.tokens and sum(s.records for s in built) == single.records
    _, after = prepared(cfg, tokenizer)
    assert (after.reused, after.built) == (3, 0)
    assert shards.assign([5, 1, 4, 4], 2) == [0, 0, 1, 1]
    assert shards.assign([3, 3, 3], 4) == [0, 1, 2]


def test_partial_and_corrupt_entries_are_rebuilt(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cfg = make_cfg(base_config, data={"tokenCache": str(cache)})
    plan, _ = prepared(cfg, tokenizer)
    expected = take(build_mixer(plan, cfg, encoder_for(cfg, tokenizer)), 60)
    entries = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    (entries[0] / shards.MANIFEST).unlink()  # a crash before the commit: data files, no manifest
    tokens = entries[1] / shards.TOKENS
    tokens.write_bytes(tokens.read_bytes()[:-6])  # truncated after the commit
    (entries[2] / shards.MANIFEST).write_text("{not json")
    plan, stats = prepared(cfg, tokenizer)
    assert (stats.built, stats.reused) == (3, 0)
    assert take(build_mixer(plan, cfg, encoder_for(cfg, tokenizer)), 60) == expected


def test_a_crash_mid_build_leaves_no_complete_entry(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cfg = make_cfg(base_config, data={"tokenCache": str(cache)})
    real_upload = storage.write_bytes

    def crash(uri: str, data: bytes) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_bytes", crash)  # the manifest write (the commit) fails
    with pytest.raises(OSError, match="disk full"):
        prepared(cfg, tokenizer)
    monkeypatch.setattr(storage, "write_bytes", real_upload)
    assert not list(cache.glob(f"*/{shards.MANIFEST}"))
    _, stats = prepared(cfg, tokenizer)
    assert stats.built == 3


def test_s3_cache_is_copied_to_local_disk_and_a_read_error_is_not_absence(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, tmp_path: Path, bucket: str
) -> None:
    uri = f"s3://{bucket}/cache/"
    cfg = make_cfg(base_config, data={"tokenCache": uri}, checkpoints={"localDir": str(tmp_path / "node-a")})
    plan, first = prepared(cfg, tokenizer)
    expected = take(build_mixer(plan, cfg, encoder_for(cfg, tokenizer)), 60)
    assert first.built == 3 and len(storage.list_folders(uri)) == 3
    other = make_cfg(cfg.to_json_dict(), checkpoints={"localDir": str(tmp_path / "node-b")})
    plan, second = prepared(other, tokenizer)
    assert second.reused == 3
    assert take(build_mixer(plan, other, encoder_for(other, tokenizer)), 60) == expected
    copied = {p.parent.name for p in (tmp_path / "node-b" / "token-cache").glob(f"*/{shards.TOKENS}")}
    assert copied and copied <= set(storage.list_folders(uri))  # copied when the stream first reads them
    # A bucket that cannot be read is an error, never "no cache entry" (which would rebuild over it).
    denied = make_cfg(cfg.to_json_dict(), data={"tokenCache": "s3://no-such-bucket-forge/cache/"})
    with pytest.raises(StorageError):
        prepared(denied, tokenizer)


# ---- bounded input ---------------------------------------------------------------------------------------------


def test_an_oversized_line_is_a_bad_line_and_the_next_one_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    big = json.dumps({"text": "x" * 5000})
    path.write_text(f'{{"text": "first"}}\n{big}\n{{"text": "third"}}\n')
    items = list(iter_file(str(path), "jsonl", 0, 0, max_record_bytes=1024))
    assert isinstance(items[1], BadLine) and items[1].line == 2
    assert items[1].reason == "line longer than data.maxRecordBytes=1024 bytes"
    third = items[2]
    assert isinstance(third, Located) and third.pos.line == 3 and third.pos.offset == len(big) + 19
    # Resuming at the third record's position reads it again.
    again = next(iter_file(str(path), "jsonl", 0, 0, third.pos.line, third.pos.offset, max_record_bytes=1024))
    assert again == third
    # A line of exactly the limit is fine.
    exact = json.dumps({"text": "y" * (1024 - 12)})
    assert len(exact) == 1024
    path.write_text(exact + "\n")
    assert isinstance(next(iter_file(str(path), "jsonl", 0, 0, max_record_bytes=1024)), Located)


def test_an_oversized_txt_file_is_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("word " * 1000)
    items = list(iter_file(str(path), "txt", 0, 0, max_record_bytes=2048))
    assert items == [BadLine(str(path), 1, "text file larger than data.maxRecordBytes=2048 bytes", 0)]


def test_oversized_lines_count_against_max_bad_lines_with_file_and_line(
    base_config: dict[str, Any], tokenizer: Any, tmp_path: Path
) -> None:
    path = tmp_path / "d" / "a.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"text": f"ticket {i}: the printer is jammed."}) for i in range(40)]
    lines[6] = json.dumps({"text": "z" * 3000})
    path.write_text("\n".join(lines) + "\n")
    for cache in (True, False):
        cfg = make_cfg(
            base_config,
            data={
                "domainPercent": 100,
                "domain": [{"uri": str(path)}],
                "maxBadLines": 0,
                "maxRecordBytes": 2048,
                "maxRepetition": 100,
                "cacheTokens": cache,
                "tokenCache": str(tmp_path / "cache"),
            },
        )
        plan = prepared(cfg, tokenizer)[0] if cache else plan_mix(cfg.data)
        mixer = build_mixer(plan, cfg, encoder_for(cfg, tokenizer))
        with pytest.raises(DataError) as err:
            take(mixer, 20)
        assert str(err.value).startswith(f"{path}:7: line longer than data.maxRecordBytes=2048 bytes")
        assert "1 bad records exceed data.maxBadLines=0" in str(err.value)


def test_max_record_bytes_is_bounded(base_config: dict[str, Any]) -> None:
    from forge_trainer.config import load_config
    from forge_trainer.errors import ConfigError

    for bad in (10, 2 << 30):
        path = Path(base_config["checkpoints"]["output"]).parent / "c.json"
        path.write_text(json.dumps(merged(base_config, data={"maxRecordBytes": bad})))
        with pytest.raises(ConfigError, match="maxRecordBytes"):
            load_config(path)
