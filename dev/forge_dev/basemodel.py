"""A tiny base model with a general ability, made offline: for the demo, e2e tests and the forgetting benchmark.

A byte-level BPE tokenizer and a small Llama are trained from scratch on the general corpus of
:mod:`forge_dev.corpora` (Python's reference prose) for a fixed number of steps, then saved as a Hugging Face
folder (config.json, model.safetensors, tokenizer files with a chat template). The result is cached by its recipe:
a second call with the same recipe returns the cached folder at once.

Needs torch and transformers (the development environment has them); the operator never imports this module.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forge_dev.controlplane import cache_dir
from forge_dev.corpora import write_domain_corpus, write_general_corpus


@dataclass(frozen=True)
class BaseModelRecipe:
    """How the tiny base model is made. Changing any field makes a new cache entry."""

    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_positions: int = 1024
    seq_length: int = 256
    batch_size: int = 16
    steps: int = 400
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    general_chars: int = 3_000_000
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class BaseModel:
    """A built base model and the corpora it came with."""

    folder: Path
    general: Path
    domain: Path
    report: dict[str, Any]


def corpora_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "corpora"


def ensure_corpora(root: Path | None = None) -> tuple[Path, Path]:
    """Write (once) the general and domain corpora; returns their folders (each with train/eval/test.jsonl)."""
    base = corpora_dir(root)
    general, domain = base / "general", base / "domain"
    if not (general / "test.jsonl").is_file():
        write_general_corpus(general)
    if not (domain / "test.jsonl").is_file():
        write_domain_corpus(domain)
    return general, domain


def _texts(path: Path) -> list[str]:
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "text" in record:
            texts.append(record["text"])
        else:
            texts.append("\n".join(m["content"] for m in record["messages"]))
    return texts


def build_base_model(recipe: BaseModelRecipe | None = None, root: Path | None = None) -> BaseModel:
    """The cached base model for ``recipe``, pretraining it first when it is not cached yet."""
    recipe = recipe or BaseModelRecipe()
    general, domain = ensure_corpora(root)
    folder = (root or cache_dir()) / "base-models" / recipe.key()
    report_path = folder / "forge-pretrain.json"
    if report_path.is_file():
        return BaseModel(folder, general, domain, json.loads(report_path.read_text()))
    report = _pretrain(recipe, general, domain, folder)
    return BaseModel(folder, general, domain, report)


def _pretrain(recipe: BaseModelRecipe, general: Path, domain: Path, folder: Path) -> dict[str, Any]:
    import torch

    from forge_trainer.tiny import CHAT_TEMPLATE, tiny_llama, train_tokenizer

    torch.manual_seed(recipe.seed)
    general_texts = _texts(general / "train.jsonl")
    # The tokenizer of a real base model was trained on broad text that includes dialogue: give it a little.
    tokenizer_texts = general_texts + _texts(domain / "train.jsonl")[:200] + ["<|system|><|user|><|assistant|>"] * 20
    tokenizer = train_tokenizer(tokenizer_texts, vocab_size=recipe.vocab_size, chat_template=CHAT_TEMPLATE)
    model = tiny_llama(
        tokenizer,
        hidden=recipe.hidden,
        layers=recipe.layers,
        heads=recipe.heads,
        kv_heads=recipe.kv_heads,
        intermediate=recipe.intermediate,
        max_positions=recipe.max_positions,
        seed=recipe.seed,
    )
    stream: list[int] = []
    for text in general_texts:
        stream.extend(tokenizer(text)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    sequences = torch.tensor(stream[: len(stream) // recipe.seq_length * recipe.seq_length]).view(-1, recipe.seq_length)
    eval_ids: list[int] = []
    for text in _texts(general / "eval.jsonl"):
        eval_ids.extend(tokenizer(text)["input_ids"])
    eval_batch = torch.tensor(eval_ids[: 32 * recipe.seq_length]).view(-1, recipe.seq_length)

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / recipe.warmup_steps) * max(0.05, 1 - step / recipe.steps)
        ),  # linear decay after warmup
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.perf_counter()
    model.train()
    loss_value = float("nan")
    for step in range(recipe.steps):
        rows = torch.randint(0, sequences.shape[0], (recipe.batch_size,), generator=generator)
        batch = sequences[rows]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if step % 50 == 0 or step == recipe.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"pretraining base model: step {step + 1}/{recipe.steps} loss {loss_value:.3f} ({elapsed:.0f} s)")
    model.eval()
    with torch.no_grad():
        eval_loss = float(model(input_ids=eval_batch, labels=eval_batch, use_cache=False).loss)
    report = {
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainTokens": len(stream),
        "finalTrainLoss": round(loss_value, 4),
        "generalEvalLoss": round(eval_loss, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    (partial / "forge-pretrain.json").write_text(json.dumps(report, indent=2))
    partial.replace(folder)  # a crash before this line leaves no half-written cache entry
    return report


if __name__ == "__main__":
    built = build_base_model()
    print(json.dumps({"folder": str(built.folder), **built.report}, indent=2))
