"""The base model: fetch (local or S3), load, wrap with LoRA, and export to a Hugging Face folder."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from forge_trainer import storage
from forge_trainer.config import ModelSettings
from forge_trainer.errors import ModelError, StorageError, StorageUnavailableError

log = logging.getLogger(__name__)

_COMPLETE = ".forge-complete"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by the processes of one node (ranks that share a local folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_model(base: str, cache_dir: Path) -> Path:
    """A local folder holding the base model: the path itself, or an S3 prefix copied once per node."""
    if not storage.is_s3(base):
        path = Path(base)
        if not (path / "config.json").is_file():
            raise ModelError(f"model.base: {base}: not a Hugging Face model folder (no config.json)")
        return path
    url = storage.parse_s3(base)
    prefix = url.key.rstrip("/") + "/" if url.key else ""
    dest = cache_dir / url.bucket / prefix.rstrip("/")
    with file_lock(cache_dir / ".model.lock"):
        if (dest / _COMPLETE).is_file():
            return dest
        try:
            files = storage.list_files(f"s3://{url.bucket}/{prefix}")
            if not any(u.endswith("/config.json") for u, _ in files):
                raise ModelError(f"model.base: {base}: no config.json under this prefix")
            for uri, _ in files:
                rel = storage.parse_s3(uri).key[len(prefix) :]
                storage.download(uri, dest / rel)
        except (ModelError, StorageUnavailableError):
            raise
        except Exception as err:
            raise StorageError(f"model.base: {base}: download failed: {type(err).__name__}: {err}") from err
        (dest / _COMPLETE).write_text("ok\n")
    return dest


def load_tokenizer(path: Path) -> Any:
    """The base model's tokenizer (must be loadable with AutoTokenizer from the model folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise ModelError(f"model.base: cannot load the tokenizer from {path}: {err}") from err


def pad_token_id(tokenizer: Any) -> int:
    """Token used to pad held-out sequences (never carries loss)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def check_attention_implementation(name: str) -> None:
    """Fail with the field's name when the chosen attention kernel cannot run here."""
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "model.attentionImplementation: flash_attention_2 needs the flash-attn package in the trainer image "
            "(pip install flash-attn); use sdpa otherwise"
        )
    if not torch.cuda.is_available():
        raise ModelError("model.attentionImplementation: flash_attention_2 runs on CUDA GPUs only; use sdpa")


def load_model(path: Path, settings: ModelSettings, activation_checkpointing: bool = False) -> torch.nn.Module:
    """The causal LM in fp32 (DeepSpeed casts for bf16), with LoRA adapters for technique 'lora'."""
    from transformers import AutoModelForCausalLM

    check_attention_implementation(settings.attention_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=settings.attention_implementation
        )
    except Exception as err:
        raise ModelError(f"model.base: cannot load the model from {path}: {err}") from err
    return prepare_for_training(model, settings, activation_checkpointing)


def prepare_for_training(model: Any, settings: ModelSettings, activation_checkpointing: bool) -> torch.nn.Module:
    """Activation checkpointing, no KV cache, and LoRA adapters for technique 'lora'."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if settings.technique == "lora":
        model = wrap_lora(model, settings)
    return model  # type: ignore[no-any-return]


def wrap_lora(model: torch.nn.Module, settings: ModelSettings) -> torch.nn.Module:
    """Add LoRA adapters (peft); only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    assert lora is not None
    cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        wrapped: torch.nn.Module = get_peft_model(model, cfg)
    except ValueError as err:
        raise ModelError(f"model.lora.targetModules: {err}") from err
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # type: ignore[operator]
    return wrapped


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); a ZeRO-3 partitioned parameter counts its full size (ds_numel)."""
    total = sum(full_numel(p) for p in model.parameters())
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


def full_numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only a partition of it on this rank."""
    return int(getattr(param, "ds_numel", param.numel()))


def save_hf(model: Any, out_dir: Path, tokenizer: Any, state_dict: dict[str, Any] | None = None) -> None:
    """An HF folder people serve: config.json says ``use_cache: true`` (training turns the KV cache off, and
    save_pretrained would otherwise write that into the export, making generation slow)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    training_value = model.config.use_cache
    model.config.use_cache = True
    try:
        model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    finally:
        model.config.use_cache = training_value
    tokenizer.save_pretrained(str(out_dir))
