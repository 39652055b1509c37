"""hf_export: Hugging Face folders written tensor by tensor from trained weights (the offline export, and the live
LoRA export under ZeRO-0/1/2), checked against what transformers and peft themselves produce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from forge_trainer.config import LoraSettings, ModelSettings
from forge_trainer.errors import ModelError
from forge_trainer.hf_export import adapter_pairs, write_hf_folder
from forge_trainer.model import load_tokenizer, wrap_lora
from tests.trainer.conftest import tied_copy

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
LORA_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def test_adapter_pairs_name_the_plain_weight_and_reject_a_lone_half() -> None:
    assert adapter_pairs([LORA_A, LORA_B, "base_model.model.model.norm.weight"]) == {
        "model.layers.0.self_attn.q_proj.weight": [(LORA_A, LORA_B)]
    }
    with pytest.raises(ModelError, match="has no lora_B"):
        adapter_pairs([LORA_A])
    with pytest.raises(ModelError, match="has no lora_A"):
        adapter_pairs([LORA_B])


def test_a_lora_export_equals_peft_merge_and_unload(tiny_model: Path, tmp_path: Path) -> None:
    settings = ModelSettings(
        base=str(tiny_model),
        technique="lora",
        lora=LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    torch.manual_seed(0)
    peft_model: Any = wrap_lora(load(tiny_model), settings)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapters something to merge
                param.normal_(std=0.05)
    # What a LoRA checkpoint holds: the adapters only (the frozen base weights are the base model's file).
    adapters = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(adapters) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    expected = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    out = tmp_path / "export"
    names = write_hf_folder(adapters, tiny_model, settings, out, load_tokenizer(tiny_model), shard_bytes=60_000)
    assert len(names) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    exported = load(out).state_dict()
    assert exported.keys() == expected.keys()
    base = load(tiny_model).state_dict()
    for key in expected:
        assert torch.allclose(exported[key], expected[key], atol=1e-6), key
    changed = {k for k in base if not torch.equal(exported[k], base[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed), changed


def test_a_full_export_of_a_tied_model_saves_the_embedding_once(tiny_model: Path, tmp_path: Path) -> None:
    model_dir = tied_copy(tiny_model, tmp_path / "tied")
    settings = ModelSettings(base=str(model_dir), technique="cpt")
    model = load(model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # the trained weights differ from the base
    # DeepSpeed's consolidation names both ends of a tied pair (the shared tensor twice).
    trained = dict(model.state_dict())
    assert "lm_head.weight" in trained
    write_hf_folder(trained, model_dir, settings, tmp_path / "out", load_tokenizer(model_dir))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    reloaded = load(tmp_path / "out")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_weights_that_do_not_match_the_base_model_are_errors_naming_them(tiny_model: Path, tmp_path: Path) -> None:
    settings = ModelSettings(base=str(tiny_model), technique="cpt")
    trained = dict(load(tiny_model).state_dict())
    tokenizer = load_tokenizer(tiny_model)
    missing = {k: v for k, v in trained.items() if k != "model.norm.weight"}
    with pytest.raises(ModelError, match=r"missing model\.norm\.weight"):
        write_hf_folder(missing, tiny_model, settings, tmp_path / "a", tokenizer)
    extra = trained | {"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match=r"no tensor model\.layers\.9\.mlp\.up_proj\.weight"):
        write_hf_folder(extra, tiny_model, settings, tmp_path / "b", tokenizer)
    lora = ModelSettings(base=str(tiny_model), technique="lora", lora=LoraSettings())
    with pytest.raises(ModelError, match="lacks LoRA weights"):
        write_hf_folder({}, tiny_model, lora, tmp_path / "c", tokenizer)
