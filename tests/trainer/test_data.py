"""Data: sources (local, S3, jsonl/chat/txt/gz), tokenise+pack, the token-exact mixer, rank slices, resume,
bad input."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forge_trainer import storage, tiny
from forge_trainer.config import TrainerConfig
from forge_trainer.data import loader
from forge_trainer.data.encode import DocEncoder
from forge_trainer.data.loader import Layout, build_mixer, plan_mix, preflight, step_batches
from forge_trainer.data.mixer import Mixer
from forge_trainer.data.records import ChatRecord, TextRecord
from forge_trainer.errors import DataError
from forge_trainer.heldout import eval_sequences
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


def mixer_for(cfg: TrainerConfig, tokenizer: Any, state: dict[str, Any] | None = None) -> tuple[Mixer, Any]:
    plan = plan_mix(cfg.data)
    return build_mixer(plan, cfg, encoder_for(cfg, tokenizer), state), plan


def take(mixer: Mixer, n: int) -> list[tuple[int, list[int], list[bool] | None]]:
    out = []
    for _ in range(n):
        s = mixer.next()
        out.append((s.source, s.ids.tolist(), None if s.mask is None else s.mask.tolist()))
    return out


# ---- records and encoding -------------------------------------------------------------------------------------


def test_text_docs_get_bos_and_eos(tokenizer: Any) -> None:
    texts = [
        "the printer is jammed",
        "  two  spaces\n\nand a ünïcode line ✓",
        tiny.general_text(random.Random(3)),
    ]
    docs = DocEncoder(tokenizer, assistant_only=False).encode([TextRecord(t) for t in texts])
    for text, doc in zip(texts, docs, strict=True):
        assert not isinstance(doc, Exception)
        assert doc.ids[0] == tokenizer.bos_token_id and doc.ids[-1] == tokenizer.eos_token_id
        # The fast path gives exactly what the tokenizer's own __call__ gives.
        assert doc.ids[1:-1].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(doc.ids[1:-1]) == text
        assert doc.mask is None


CHAT = ChatRecord(
    (
        ("system", "be brief"),
        ("user", "my phone is slow"),
        ("assistant", "i reset it."),
        ("user", "thanks"),
        ("assistant", "welcome"),
    )
)


def test_sft_mask_with_chat_template(tokenizer: Any) -> None:
    doc = DocEncoder(tokenizer, assistant_only=True).encode([CHAT])[0]
    assert not isinstance(doc, Exception) and doc.mask is not None
    # Loss on the assistant turns and the end-of-turn token the template emits after each; nothing else.
    assert tokenizer.decode(doc.ids[doc.mask]) == "i reset it.</s>welcome</s>"
    assert "my phone" in tokenizer.decode(doc.ids[~doc.mask])


def test_sft_mask_with_fallback_template(tiny_model_no_template: Path) -> None:
    tok = load_tokenizer(tiny_model_no_template)
    doc = DocEncoder(tok, assistant_only=True).encode([CHAT])[0]
    assert not isinstance(doc, Exception) and doc.mask is not None
    assert tok.decode(doc.ids) == (
        "<s><|system|>\nbe brief\n<|user|>\nmy phone is slow\n<|assistant|>\ni reset it.\n<|user|>\nthanks\n"
        "<|assistant|>\nwelcome\n</s>"
    )
    assert tok.decode(doc.ids[doc.mask]) == "i reset it.\nwelcome\n</s>"


def test_cpt_trains_on_whole_chat(tokenizer: Any) -> None:
    doc = DocEncoder(tokenizer, assistant_only=False).encode([CHAT])[0]
    assert not isinstance(doc, Exception) and doc.mask is None


def test_sft_chat_without_assistant_is_bad(tokenizer: Any) -> None:
    out = DocEncoder(tokenizer, assistant_only=True).encode([ChatRecord((("user", "hello"),))])
    assert isinstance(out[0], Exception) and "no assistant tokens" in str(out[0])


# ---- the mixer -------------------------------------------------------------------------------------------------


def test_realised_mix_is_token_exact(base_config: dict[str, Any], corpora: Corpora, tokenizer: Any) -> None:
    cfg = make_cfg(
        base_config,
        data={
            "domainPercent": 37,
            "general": [{"uri": str(corpora.general), "weight": 3}, {"uri": str(corpora.chat), "weight": 1}],
        },
    )
    mixer, _ = mixer_for(cfg, tokenizer)
    targets = [37.0, 63.0 * 3 / 4, 63.0 / 4]
    for n in range(1, 401):
        s = mixer.next()
        assert len(s.ids) == 64
        counts = [src.counters.sequences for src in mixer.sources]
        for count, target in zip(counts, targets, strict=True):
            assert abs(count - n * target / 100) < 1.0 + 1e-9, (n, counts)
    report = mixer.report()
    assert report["tokens"] == 400 * 64
    assert abs(report["realisedDomainPercent"] - 37) <= 1.0
    assert [round(r["realisedPercent"], 1) for r in report["sources"]] == [37.0, 47.2, 15.8]


def sft_mix(base_config: dict[str, Any], corpora: Corpora, mix_by: str) -> TrainerConfig:
    """sft on chats (loss on the assistant turns only) against replayed plain text (loss on every token)."""
    return make_cfg(
        base_config,
        model={"technique": "sft"},
        data={
            "domainPercent": 60,
            "domain": [{"uri": str(corpora.chat)}],
            "general": [{"uri": str(corpora.general) + "/"}],
            "mixBy": mix_by,
        },
    )


def test_mixed_by_tokens_the_gradient_share_is_reported_and_differs(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any
) -> None:
    cfg = sft_mix(base_config, corpora, "tokens")
    mixer, _ = mixer_for(cfg, tokenizer)
    take(mixer, 300)
    report = mixer.report()
    assert abs(report["realisedDomainPercent"] - 60) <= 1.0
    loss = report["domainLossTokens"] + report["generalLossTokens"]
    assert report["realisedDomainGradientPercent"] == pytest.approx(100 * report["domainLossTokens"] / loss)
    # The chats' prompts carry no loss: their share of the gradient is well under their share of the tokens.
    assert report["realisedDomainGradientPercent"] < 40, report  # 25.5% with the test corpora


def test_mixed_by_loss_tokens_every_source_keeps_its_share_of_the_gradient(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any
) -> None:
    cfg = sft_mix(base_config, corpora, "lossTokens")
    mixer, plan = mixer_for(cfg, tokenizer)
    total_share = sum(plan.shares)
    for n in range(1, 301):
        mixer.next()
        loss = [src.counters.loss_tokens for src in mixer.sources]
        for got, share in zip(loss, plan.shares, strict=True):
            assert abs(got - sum(loss) * share / total_share) <= 64, (n, loss)  # within one sequence's tokens
    report = mixer.report()
    assert abs(report["realisedDomainGradientPercent"] - 60) <= 1.0, report
    # More chat tokens are needed for the same loss tokens: 86.7% of the input tokens with the test corpora.
    assert report["realisedDomainPercent"] > 75, report


def test_mixed_by_loss_tokens_resumes_exactly_and_is_another_stream(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any
) -> None:
    cfg = sft_mix(base_config, corpora, "lossTokens")
    mixer, plan = mixer_for(cfg, tokenizer)
    take(mixer, 40)
    state = loader.data_state(mixer, plan, cfg)
    expected = take(mixer, 40)
    resumed, _ = mixer_for(cfg, tokenizer, state)
    assert take(resumed, 40) == expected
    by_tokens = sft_mix(base_config, corpora, "tokens")
    with pytest.raises(DataError, match=r"data\.mixBy"):
        mixer_for(by_tokens, tokenizer, state)


def test_same_seed_same_stream_other_seed_other_order(base_config: dict[str, Any], tokenizer: Any) -> None:
    cfg = make_cfg(base_config)
    a, _ = mixer_for(cfg, tokenizer)
    b, _ = mixer_for(cfg, tokenizer)
    assert take(a, 50) == take(b, 50)
    other, _ = mixer_for(make_cfg(base_config, training={"seed": 8}), tokenizer)
    # The domain folder has two files: another seed reads them in another order in at least one pass.
    seqs_a = [s for s in take(a, 400) if s[0] == 0]
    seqs_o = [s for s in take(other, 450) if s[0] == 0]
    assert seqs_a[:40] != seqs_o[:40] or seqs_a[200:240] != seqs_o[200:240]


def test_rank_slices_are_disjoint_and_their_union_is_the_single_rank_stream(
    base_config: dict[str, Any], tokenizer: Any
) -> None:
    single_cfg = make_cfg(base_config, training={"microBatchSize": 2, "gradientAccumulationSteps": 4})
    multi_cfg = make_cfg(base_config, training={"microBatchSize": 2, "gradientAccumulationSteps": 2})
    m1, plan1 = mixer_for(single_cfg, tokenizer)
    single = step_batches(m1, plan1, single_cfg, Layout(1, 0, 2, 4), 0)
    ranks = []
    for r in range(2):
        m, plan = mixer_for(multi_cfg, tokenizer)
        ranks.append(step_batches(m, plan, multi_cfg, Layout(2, r, 2, 2), 0))
    for _ in range(6):
        one = next(single)
        parts = [next(it) for it in ranks]
        single_rows = [tuple(row.tolist()) for mb in one.micro for row in mb.ids]
        rank_rows = [[tuple(row.tolist()) for mb in p.micro for row in mb.ids] for p in parts]
        assert len(rank_rows[0]) == len(rank_rows[1]) == 4
        assert sorted(rank_rows[0] + rank_rows[1]) == sorted(single_rows)
        # Disjoint by position: micro-batch m of rank r is block (m * world + r) of the step.
        assert rank_rows[0][:2] == single_rows[0:2] and rank_rows[1][:2] == single_rows[2:4]
        assert rank_rows[0][2:] == single_rows[4:6] and rank_rows[1][2:] == single_rows[6:8]
        assert one.global_loss_tokens == parts[0].global_loss_tokens == 8 * 63
        assert one.state == parts[0].state == parts[1].state


def test_resume_continues_the_exact_stream(
    base_config: dict[str, Any], corpora: Corpora, tiny_model: Path, tokenizer: Any, tmp_path: Path
) -> None:
    # A small source that wraps around several times, chat records with SFT masks, long documents spanning sequences.
    small = tiny.write_corpus(tmp_path / "small" / "s.jsonl", "domain", 30, 9)
    long_doc = tmp_path / "long" / "book.txt"
    long_doc.parent.mkdir()
    long_doc.write_text(" ".join(tiny.domain_text(random.Random(i)) for i in range(60)))
    cfg = make_cfg(
        base_config,
        model={"technique": "sft"},
        data={
            "domain": [{"uri": str(small)}, {"uri": str(corpora.chat)}],
            "general": [{"uri": str(long_doc.parent)}],
            "maxRepetition": 50,
        },
    )
    a, plan = mixer_for(cfg, tokenizer)
    it = step_batches(a, plan, cfg, Layout(1, 0, 4, 2), 0)
    for _ in range(7):
        batch = next(it)
    saved = json.loads(json.dumps(batch.state))
    expected = take(a, 120)
    b, _ = mixer_for(cfg, tokenizer, saved)
    assert take(b, 120) == expected
    assert b.report() == a.report()
    assert any(r["passes"] and r["passes"] > 1 for r in a.report()["sources"])


def test_resume_refuses_another_stream(base_config: dict[str, Any], tokenizer: Any) -> None:
    cfg = make_cfg(base_config)
    a, plan = mixer_for(cfg, tokenizer)
    state = next(step_batches(a, plan, cfg, Layout(1, 0, 4, 2), 0)).state
    with pytest.raises(DataError, match="changed since the checkpoint"):
        mixer_for(make_cfg(base_config, data={"domainPercent": 50}), tokenizer, state)


def test_eval_set_is_fixed_and_padded(base_config: dict[str, Any], corpora: Corpora, tokenizer: Any) -> None:
    cfg = make_cfg(base_config)
    enc = encoder_for(cfg, tokenizer)
    first = eval_sequences(cfg.eval.domain, 1024, cfg, enc, pad_id=0)
    again = eval_sequences(cfg.eval.domain, 1024, cfg, enc, pad_id=0)
    assert len(first) == 16
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(first, again, strict=True))
    assert {x.source for x in first} == {0}
    tiny_set = eval_sequences(cfg.eval.domain, 10**7, cfg, enc, pad_id=0)
    ids, mask = tiny_set[-1].ids, tiny_set[-1].mask
    assert mask is not None and not mask[-1] and ids[-1] == 0  # the last, partial sequence is padded, no loss


# ---- file formats and S3 ---------------------------------------------------------------------------------------


def write_gz(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def test_txt_and_gz_sources(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "one.txt").write_text("the router on floor 2 is offline. fix: power cycled it.\n" * 20)
    write_gz(folder / "more.jsonl.gz", [{"text": "ticket 7: the phone is slow."}] * 40)
    (folder / "README.md").write_text("ignored")
    cfg = make_cfg(base_config, data={"domainPercent": 100, "domain": [{"uri": str(folder)}], "maxRepetition": 100})
    mixer, plan = mixer_for(cfg, tokenizer)
    assert [f.kind for f in plan.files[0].files] == ["jsonl", "txt"]
    text = tokenizer.decode(np.concatenate([mixer.next().ids for _ in range(30)]))
    assert "router on floor 2" in text and "ticket 7" in text
    st = mixer.state()
    cont = take(mixer, 40)
    again, _ = mixer_for(cfg, tokenizer, {**st, "fingerprint": plan.fingerprint(7, 64)})
    assert take(again, 40) == cont


def upload_tree(local: Path, bucket: str, prefix: str) -> str:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.upload(p, f"s3://{bucket}/{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def test_s3_source_matches_local_and_resumes_mid_file(
    base_config: dict[str, Any], corpora: Corpora, tokenizer: Any, bucket: str
) -> None:
    uri = upload_tree(corpora.domain, bucket, "tickets")
    upload_tree(corpora.domain, bucket, "tickets2")  # a sibling prefix must not leak into "tickets"
    local_cfg = make_cfg(base_config, data={"domainPercent": 100})
    s3_cfg = make_cfg(base_config, data={"domainPercent": 100, "domain": [{"uri": uri}]})
    local, _ = mixer_for(local_cfg, tokenizer)
    remote, plan = mixer_for(s3_cfg, tokenizer)
    assert len(plan.files[0].files) == 2
    assert take(remote, 60) == take(local, 60)
    st = {**remote.state(), "fingerprint": plan.fingerprint(7, 64)}
    assert st["sources"][0]["doc"]["offset"] > 0  # resuming inside a file: an HTTP range request
    cont = take(remote, 30)
    resumed, _ = mixer_for(s3_cfg, tokenizer, st)
    assert take(resumed, 30) == cont


# ---- bad input ---------------------------------------------------------------------------------------------------


def expect_data_error(cfg: TrainerConfig, tokenizer: Any, steps: int = 10) -> str:
    with pytest.raises(DataError) as err:
        plan = plan_mix(cfg.data)
        enc = encoder_for(cfg, tokenizer)
        preflight(plan, cfg, enc, steps * 8)
        mixer = build_mixer(plan, cfg, enc)
        take(mixer, steps * 8)
    return str(err.value)


def test_empty_folder(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.parquet").write_text("x")
    msg = expect_data_error(make_cfg(base_config, data={"domain": [{"uri": str(tmp_path / "empty")}]}), tokenizer)
    assert f"source {tmp_path / 'empty'}: empty source: no .jsonl or .txt files" in msg
    assert "data.parquet" in msg


def test_missing_path(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    msg = expect_data_error(make_cfg(base_config, data={"domain": [{"uri": str(tmp_path / "nope")}]}), tokenizer)
    assert "empty source" in msg and "nope" in msg


def test_file_without_records(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "blank" / "a.jsonl"
    path.parent.mkdir()
    path.write_text("\n  \n\n")
    msg = expect_data_error(make_cfg(base_config, data={"domain": [{"uri": str(path.parent)}]}), tokenizer)
    assert "empty source: no usable records in 1 file(s)" in msg


def test_unreadable_file(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "broken" / "a.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(b"this is not gzip data at all\n")
    msg = expect_data_error(make_cfg(base_config, data={"domain": [{"uri": str(path.parent)}]}), tokenizer)
    assert f"{path}: cannot read: BadGzipFile" in msg


def test_missing_bucket(base_config: dict[str, Any], tokenizer: Any, s3: Any) -> None:
    msg = expect_data_error(make_cfg(base_config, data={"domain": [{"uri": "s3://no-such-bucket/x/"}]}), tokenizer)
    assert "source s3://no-such-bucket/x/: cannot list: NoSuchBucket" in msg


def bad_lines_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"ticket {i}: the printer is jammed."}) for i in range(40)]
    lines[3] = '{"text": "unterminated'
    lines[10] = json.dumps({"txt": "wrong key"})
    lines[20] = json.dumps({"messages": [{"role": "user"}]})
    path = folder / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_beyond_limit_name_file_and_line(
    base_config: dict[str, Any], tokenizer: Any, tmp_path: Path
) -> None:
    path = bad_lines_file(tmp_path / "bad")
    cfg = make_cfg(base_config, data={"domain": [{"uri": str(path)}], "maxBadLines": 2, "maxRepetition": 100})
    msg = expect_data_error(cfg, tokenizer)
    assert msg.startswith(f"{path}:21: messages[0].content must be a string")
    assert "3 bad records exceed data.maxBadLines=2" in msg


def test_malformed_lines_within_limit_are_skipped_and_counted(
    base_config: dict[str, Any], tokenizer: Any, tmp_path: Path
) -> None:
    path = bad_lines_file(tmp_path / "bad")
    cfg = make_cfg(
        base_config, data={"domainPercent": 100, "domain": [{"uri": str(path)}], "maxBadLines": 3, "maxRepetition": 100}
    )
    mixer, _ = mixer_for(cfg, tokenizer)
    take(mixer, 40)  # several passes: bad lines are counted once
    assert mixer.report()["sources"][0]["badLines"] == 3


def test_source_too_small_fails_at_start(base_config: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    small = tiny.write_corpus(tmp_path / "small" / "s.jsonl", "domain", 20, 1)
    cfg = make_cfg(base_config, data={"domain": [{"uri": str(small)}], "maxRepetition": 2})
    msg = expect_data_error(cfg, tokenizer, steps=50)
    assert f"source {small}: insufficient tokens: it holds" in msg
    assert "> data.maxRepetition=2" in msg


def test_large_source_too_small_fails_while_streaming(
    base_config: dict[str, Any], tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "PREFLIGHT_COUNT_BYTES", 100)  # treat every source as too large to count first
    small = tiny.write_corpus(tmp_path / "small" / "s.jsonl", "domain", 20, 1)
    cfg = make_cfg(base_config, data={"domainPercent": 100, "domain": [{"uri": str(small)}], "maxRepetition": 2})
    msg = expect_data_error(cfg, tokenizer, steps=50)
    assert f"source {small}: insufficient tokens: it holds" in msg
    assert "more than data.maxRepetition=2 passes" in msg


def test_skipped_bad_lines_are_named_in_the_log(
    base_config: dict[str, Any], tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = bad_lines_file(tmp_path / "bad")
    cfg = make_cfg(
        base_config, data={"domainPercent": 100, "domain": [{"uri": str(path)}], "maxBadLines": 3, "maxRepetition": 100}
    )
    mixer, _ = mixer_for(cfg, tokenizer)
    with caplog.at_level("WARNING", logger="forge_trainer.data.pack"):
        take(mixer, 40)
    named = [r.getMessage() for r in caplog.records if "skipped (bad record" in r.getMessage()]
    assert [m.split(": ", 1)[0] for m in named] == [f"{path}:4", f"{path}:11", f"{path}:21"]
    assert "data.maxBadLines=3" in named[0]
