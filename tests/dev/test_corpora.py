"""The offline corpora are deterministic, split without overlap, and in the trainer's record formats."""

from __future__ import annotations

import json
from pathlib import Path

from forge_dev.corpora import (
    package_descriptions,
    split_of,
    support_tickets,
    write_domain_corpus,
    write_general_corpus,
    write_unseen_corpus,
)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_general_corpus_is_deterministic_and_splits_are_disjoint(tmp_path: Path) -> None:
    first = write_general_corpus(tmp_path / "a", max_chars=200_000)
    second = write_general_corpus(tmp_path / "b", max_chars=200_000)
    for split in ("train", "eval", "test"):
        assert _lines(first.files[split]) == _lines(second.files[split])
    train, evaluation, test = (set(_lines(first.files[s])) for s in ("train", "eval", "test"))
    assert train and evaluation and test
    assert not train & evaluation and not train & test and not evaluation & test
    assert all("text" in json.loads(line) for line in train)
    assert sum(first.characters.values()) >= 200_000


def test_domain_corpus_chat_and_text_formats(tmp_path: Path) -> None:
    chat = write_domain_corpus(tmp_path / "chat", tickets=200, seed=3)
    text = write_domain_corpus(tmp_path / "text", tickets=200, seed=3, chat=False)
    assert sum(chat.documents.values()) == 200 == sum(text.documents.values())
    record = json.loads(_lines(chat.files["train"])[0])
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert "assistant:" in json.loads(_lines(text.files["train"])[0])["text"]


def test_ticket_generator_depends_on_seed() -> None:
    assert [t.messages for t in support_tickets(5, seed=1)] == [t.messages for t in support_tickets(5, seed=1)]
    assert [t.messages for t in support_tickets(5, seed=1)] != [t.messages for t in support_tickets(5, seed=2)]


def test_split_of_is_stable_and_roughly_balanced() -> None:
    splits = [split_of(f"doc-{i}") for i in range(2000)]
    assert split_of("doc-1") == split_of("doc-1")
    assert 100 < splits.count("eval") < 300 and 100 < splits.count("test") < 300


def test_unseen_corpus_has_no_train_split_and_keeps_each_package_in_one_split(tmp_path: Path) -> None:
    first = write_unseen_corpus(tmp_path / "a", max_chars=300_000)
    second = write_unseen_corpus(tmp_path / "b", max_chars=300_000)
    assert sorted(first.files) == ["eval", "test"] and not (tmp_path / "a" / "train.jsonl").exists()
    package_of = {text: key.rsplit(":", 1)[0] for key, text in package_descriptions(300_000)}
    packages = {}
    for split in ("eval", "test"):
        assert _lines(first.files[split]) == _lines(second.files[split])
        packages[split] = {package_of[json.loads(line)["text"]] for line in _lines(first.files[split])}
        assert len(packages[split]) > 3
    assert not packages["eval"] & packages["test"]
    assert sum(first.characters.values()) >= 250_000
