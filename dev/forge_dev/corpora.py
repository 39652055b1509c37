"""Small offline corpora for the demo, the end-to-end tests and the forgetting benchmark.

- general: English technical prose that ships with every Python, no download: the language reference topics
  of ``pydoc_data`` and the docstrings of the standard library. A tiny base model pretrained on it has a
  "general ability" to lose.
- unseen general: the long descriptions (READMEs) of the Python distributions installed beside Forge, English prose
  of many authors and topics that the general corpus does not contain. It is written as eval/test splits only, to
  be given as ``eval.unseenGeneral``: general text that is never replayed.
- domain: synthetic customer-support conversations for an invented product line, generated from templates with a
  seeded random generator. Their vocabulary, register and structure differ clearly from the general corpus, so
  fine-tuning on them without general data shows catastrophic forgetting.

Every corpus is deterministic for its seed and split into train / eval / test parts that share no document.
Files are JSON lines in the trainer's formats: ``{"text": ...}`` or ``{"messages": [{"role", "content"}]}``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "eval", "test")

# Standard-library modules whose import has side effects (GUI, this-is-python poems, test suites) or is slow.
_SKIPPED_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3"})


def split_of(key: str, eval_percent: int = 10, test_percent: int = 10) -> str:
    """The split a document belongs to, stable across runs and machines (a hash of its key)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    if bucket < eval_percent:
        return "eval"
    if bucket < eval_percent + test_percent:
        return "test"
    return "train"


def _stdlib_module_names() -> list[str]:
    names = set(sys.stdlib_module_names)
    return sorted(name for name in names if not name.startswith("_") and name not in _SKIPPED_MODULES)


def _long_doc(value: Any) -> str | None:
    doc = inspect.getdoc(value)
    return doc if doc and len(doc) > 80 else None


def _docstrings_of(module: Any) -> Iterator[str]:
    doc = inspect.getdoc(module)
    if doc:
        yield doc
    for attribute in sorted(vars(module)):
        if attribute.startswith("_"):
            continue
        value = getattr(module, attribute, None)
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isroutine(value) and (doc := _long_doc(value)):
            yield doc
        elif inspect.isclass(value):
            if doc := _long_doc(value):
                yield doc
            for member_name in sorted(vars(value)):
                member = vars(value)[member_name]
                if not member_name.startswith("_") and inspect.isroutine(member) and (doc := _long_doc(member)):
                    yield doc


def general_documents(max_chars: int = 3_000_000) -> Iterator[tuple[str, str]]:
    """(key, text) pairs of Python's reference topics and stdlib docstrings, in a fixed order, up to ``max_chars``."""
    from pydoc_data.topics import topics

    total = 0
    for topic in sorted(topics):
        # Topics are long: cut them at blank lines into paragraphs-sized documents.
        for index, chunk in enumerate(_chunks(topics[topic], 2000)):
            yield f"topic:{topic}:{index}", chunk
            total += len(chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _stdlib_module_names():
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific modules may fail to import: skip them
                continue
            for index, doc in enumerate(_docstrings_of(module)):
                yield f"{name}:{index}", doc
                total += len(doc)
                if total >= max_chars:
                    return


def package_descriptions(max_chars: int = 1_500_000, min_chars: int = 400) -> Iterator[tuple[str, str]]:
    """(key, text) pieces of the installed distributions' long descriptions, by distribution name, up to
    ``max_chars``. Descriptions shorter than ``min_chars`` (a one-line summary, a link) are skipped."""
    import importlib.metadata

    by_name: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        metadata: Any = dist.metadata  # an email.message.Message: the long description is its body
        name = (metadata.get("Name") or "").lower()
        body = metadata.get_payload() or metadata.get("Description") or ""
        if name and name not in by_name and len(body.strip()) >= min_chars:
            by_name[name] = body.strip()
    total = 0
    for name in sorted(by_name):
        for index, chunk in enumerate(_chunks(by_name[name], 2000)):
            yield f"package:{name}:{index}", chunk
            total += len(chunk)
            if total >= max_chars:
                return


def _chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive pieces of ``text`` of about ``size`` characters, cut at paragraph breaks."""
    piece: list[str] = []
    length = 0
    for paragraph in text.split("\n\n"):
        piece.append(paragraph)
        length += len(paragraph)
        if length >= size:
            yield "\n\n".join(piece)
            piece, length = [], 0
    if piece:
        yield "\n\n".join(piece)


PRODUCTS = ("Nimbus router", "Quill tablet", "Harbor NAS", "Lumen doorbell", "Atlas thermostat", "Vela earbuds")
SYMPTOMS = (
    ("keeps dropping the connection every few minutes", "firmware", "reset the network module"),
    ("will not pair with my phone anymore", "pairing", "clear the pairing list and pair again"),
    ("shows error code {code} on start-up", "error-code", "install firmware {version} from the companion app"),
    ("battery drains overnight even when idle", "battery", "turn off background sync in Settings > Power"),
    ("is stuck on the logo after the last update", "boot-loop", "hold the reset button for ten seconds"),
    ("reports the wrong temperature by a few degrees", "calibration", "run the calibration wizard"),
    ("cannot reach the cloud dashboard", "cloud", "check that port 443 is open on your router"),
)
CLOSINGS = (
    "Let me know if that solves it, and have a great day!",
    "If the issue persists, reply with your order number and we will arrange a replacement.",
    "I have also added a note to your ticket {ticket} so the next agent sees the history.",
)


@dataclass(frozen=True)
class Ticket:
    """One synthetic support conversation."""

    key: str
    messages: list[dict[str, str]]

    def as_text(self) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


def support_tickets(count: int, seed: int = 7) -> Iterator[Ticket]:
    """``count`` deterministic support conversations (system, user, assistant, user, assistant)."""
    rng = random.Random(seed)
    for number in range(count):
        product = rng.choice(PRODUCTS)
        symptom, topic, fix = rng.choice(SYMPTOMS)
        code = f"E{rng.randint(100, 999)}"
        version = f"{rng.randint(2, 5)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}"
        ticket = f"T-{rng.randint(10000, 99999)}"
        details = rng.choice(("since yesterday", "after I moved house", "out of the box", "since the update"))
        user_first = f"Hi, my {product} {symptom.format(code=code)} {details}. What should I do?"
        assistant_first = (
            f"Sorry to hear your {product} is giving you trouble. This looks like a known {topic} issue. "
            f"Please {fix.format(version=version)}, then restart the device."
        )
        user_second = rng.choice(
            (
                "I tried that and it still happens.",
                "Done, it seems better now. Anything else?",
                "Where do I find that option?",
            )
        )
        assistant_second = (
            f"Thanks for checking. Open the companion app, choose your {product}, then Support > Diagnostics "
            f"and send the report. {rng.choice(CLOSINGS).format(ticket=ticket)}"
        )
        yield Ticket(
            key=f"ticket-{seed}-{number}",
            messages=[
                {"role": "system", "content": "You are the support assistant for Acme devices."},
                {"role": "user", "content": user_first},
                {"role": "assistant", "content": assistant_first},
                {"role": "user", "content": user_second},
                {"role": "assistant", "content": assistant_second},
            ],
        )


@dataclass(frozen=True)
class CorpusFiles:
    """Paths of one written corpus: ``files[split]`` is a JSON-lines file."""

    files: dict[str, Path]
    documents: dict[str, int]
    characters: dict[str, int]


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_general_corpus(folder: Path, max_chars: int = 3_000_000) -> CorpusFiles:
    """Write general/{train,eval,test}.jsonl with ``{"text": ...}`` records; repeated texts are kept once."""
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for key, text in general_documents(max_chars):
        if text in seen:
            continue
        seen.add(text)
        records[split_of(key)].append({"text": text})
    return _write_splits(folder, records)


def write_unseen_corpus(folder: Path, max_chars: int = 1_500_000) -> CorpusFiles:
    """Write unseen/{eval,test}.jsonl (``{"text": ...}``) from :func:`package_descriptions`, split by distribution
    so that no README has pieces in both; there is no train split."""
    records: dict[str, list[dict[str, Any]]] = {"eval": [], "test": []}
    for key, text in package_descriptions(max_chars):
        package = key.rsplit(":", 1)[0]
        records["eval" if split_of(package, eval_percent=50, test_percent=50) == "eval" else "test"].append(
            {"text": text}
        )
    return _write_splits(folder, records)


def write_domain_corpus(folder: Path, tickets: int = 4000, seed: int = 7, chat: bool = True) -> CorpusFiles:
    """Write domain/{train,eval,test}.jsonl: chat ``messages`` records, or ``text`` records when ``chat`` is off."""
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for ticket in support_tickets(tickets, seed):
        record: dict[str, Any] = {"messages": ticket.messages} if chat else {"text": ticket.as_text()}
        records[split_of(ticket.key)].append(record)
    return _write_splits(folder, records)


def _write_splits(folder: Path, records: dict[str, list[dict[str, Any]]]) -> CorpusFiles:
    files: dict[str, Path] = {}
    documents: dict[str, int] = {}
    characters: dict[str, int] = {}
    for split, rows in records.items():
        path = folder / f"{split}.jsonl"
        _write_jsonl(path, rows)
        files[split] = path
        documents[split] = len(rows)
        characters[split] = sum(len(json.dumps(row)) for row in rows)
    return CorpusFiles(files=files, documents=documents, characters=characters)
