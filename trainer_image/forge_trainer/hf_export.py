"""Hugging Face folders from trained weights that are not a live ZeRO-3 module, one tensor at a time.

Two callers: ``forge-trainer export`` (a checkpoint's consolidated weights, read lazily from its ZeRO shards) and the
live export of a LoRA run under ZeRO-0/1/2 (the engine module's state dict). Neither builds a second model: every
tensor of the base model's safetensors is taken from the trained weights (or, for a LoRA run, from the base file,
with the layer's adapters merged in: ``W + alpha / rank * B @ A``, peft's merge) and handed to a
:class:`~forge_trainer.sharded.ShardWriter`. The peak is one tensor plus one shard, never the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from forge_trainer.config import ModelSettings
from forge_trainer.errors import ModelError
from forge_trainer.sharded import ShardWriter, TensorSource, lora_export_name, shard_bytes_setting

PEFT_PREFIX = "base_model.model."


class LazyTensor(Protocol):
    """A tensor, or DeepSpeed's lazily gathered stand-in for one: ``contiguous()`` gives the real tensor."""

    def contiguous(self) -> torch.Tensor: ...


def adapter_pairs(names: list[str]) -> dict[str, list[tuple[str, str]]]:
    """The LoRA adapters among peft parameter names: plain weight name -> [(lora_A name, lora_B name)], one pair
    per adapter. A lora_A without its lora_B (or the reverse) is an error naming it."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    name_set = set(names)
    for name in names:
        if ".lora_A." not in name:
            if ".lora_B." in name and name.replace(".lora_B.", ".lora_A.", 1) not in name_set:
                raise ModelError(f"checkpoint: LoRA weight {name} has no lora_A")
            continue
        partner = name.replace(".lora_A.", ".lora_B.", 1)
        if partner not in name_set:
            raise ModelError(f"checkpoint: LoRA weight {name} has no lora_B")
        layer = name.split(".lora_A.", 1)[0]
        layer = layer.removeprefix(PEFT_PREFIX)
        pairs.setdefault(f"{layer}.weight", []).append((name, partner))
    return pairs


def merged_tensors(
    trained: Mapping[str, LazyTensor], base: TensorSource, settings: ModelSettings, tied: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) of every tensor of the base model's file, in its order, from the trained weights.

    ``trained`` holds plain names (a full fine-tune) or peft names (LoRA: adapters, and the base layers unless the
    checkpoint left the frozen weights out). A weight the file has and training does not is taken from the file
    only for LoRA (frozen); a full fine-tune missing one is an error, the output embedding of a tied model aside
    (saved once, as the input embedding). A trained weight the file does not have is an error too."""
    lora = settings.technique == "lora"
    plain: dict[str, str] = {}
    for name in trained:
        export_name = lora_export_name(name) if lora else name
        if export_name is not None:
            plain[export_name] = name
    adapters = adapter_pairs(list(trained)) if lora else {}
    scale = settings.lora.alpha / settings.lora.rank if settings.lora is not None else 0.0
    unknown = [n for n in [*plain, *adapters] if n not in base.file_of and not (tied and n.endswith("lm_head.weight"))]
    if unknown:
        raise ModelError(f"checkpoint does not match the base model {base.folder}: no tensor {unknown[0]} there")
    if lora and not adapters:
        raise ModelError("checkpoint lacks LoRA weights (no lora_A/lora_B tensors)")
    for key in sorted(base.file_of):
        if key in plain:
            weight = trained[plain[key]].contiguous().float()
        elif lora:
            weight = base.get(key).float()
        else:
            raise ModelError(f"checkpoint does not match the model: missing {key}")
        for a_name, b_name in adapters.get(key, []):
            delta = trained[b_name].contiguous().float() @ trained[a_name].contiguous().float()
            weight = weight + scale * delta
        yield key, weight


def write_hf_folder(
    trained: Mapping[str, LazyTensor],
    base_dir: Path,
    settings: ModelSettings,
    out_dir: Path,
    tokenizer: Any,
    shard_bytes: int | None = None,
) -> list[str]:
    """A Hugging Face folder (fp32 safetensors shards, config, generation config, tokenizer) from trained weights
    and the base model's folder; returns the weight files' names. config.json says ``use_cache: true``: exports are
    for serving."""
    from transformers import AutoConfig, GenerationConfig

    config: Any = AutoConfig.from_pretrained(str(base_dir))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    source = TensorSource(base_dir)
    try:
        writer = ShardWriter(out_dir, shard_bytes or shard_bytes_setting())
        for key, tensor in merged_tensors(trained, source, settings, tied):
            writer.add(key, tensor)
        names = writer.finish()
    finally:
        source.close()
    config.use_cache = True
    config.dtype = torch.float32
    config.save_pretrained(str(out_dir))
    if (base_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return names
