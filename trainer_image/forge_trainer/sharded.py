"""The ZeRO-3 model lifecycle: build partitioned, read each rank's own rows, export parameter by parameter.

With ``training.zeroStage`` 3 no rank ever holds the whole model:

* :func:`build_partitioned` constructs the causal LM under ``deepspeed.zero.Init`` (each module's parameters are
  partitioned as soon as the module exists) and :func:`load_partitions` fills every parameter's local partition
  from the safetensors files, reading only the rows that cover that partition (``safe_open(...).get_slice``);
* :func:`export_partitioned` writes a Hugging Face folder by gathering one parameter (or one LoRA layer) at a time
  with ``GatheredParameters``; rank 0 appends it to a :class:`ShardWriter`, which writes a safetensors shard as soon
  as it holds ``shard_bytes``, so the export's peak is one shard, never the whole state dict.

The same partition reader loads end-of-run candidates into the engine's own ZeRO-3 module, so evaluating a
candidate needs no second model either.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from forge_trainer.config import ModelSettings
from forge_trainer.errors import ModelError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
"""Largest safetensors shard an export writes (rank 0 holds at most one shard of gathered tensors)."""
SHARD_BYTES_ENV = "FORGE_EXPORT_SHARD_BYTES"


# ---- pure partition arithmetic --------------------------------------------------------------------------------


def partition_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """(first flat element, element count) of ``rank``'s ZeRO-3 partition of a tensor of ``numel`` elements.

    DeepSpeed gives every rank ``ceil(numel / world)`` slots in rank order; the last ranks' slots past the end are
    padding (count 0 or fewer than the slots)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    size = math.ceil(numel / world)
    start = min(numel, size * rank)
    return start, max(0, min(size, numel - start))


def rows_covering(shape: tuple[int, ...], start: int, count: int) -> tuple[int, int, int]:
    """(first row, end row, offset into the first row) of the dim-0 rows holding flat elements [start, start+count)
    of a C-contiguous tensor of ``shape``; a 0-d tensor is one row of one element."""
    if count <= 0:
        return 0, 0, 0
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first = start // row
    end = math.ceil((start + count) / row)
    return first, end, start - first * row


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names of ``count`` weight files: one ``model.safetensors``, or numbered shards."""
    if count == 1:
        return [WEIGHTS_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def lora_export_name(name: str) -> str | None:
    """The plain model's name of a peft parameter; None for LoRA adapter weights (merged into their layer)."""
    if ".lora_" in name:
        return None
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def shard_bytes_setting() -> int:
    """The export's shard size: FORGE_EXPORT_SHARD_BYTES, else 2 GiB."""
    raw = os.environ.get(SHARD_BYTES_ENV, "")
    return int(raw) if raw else DEFAULT_SHARD_BYTES


# ---- safetensors folders ---------------------------------------------------------------------------------------


class TensorSource:
    """Lazy access to the tensors of a Hugging Face safetensors folder (one file or indexed shards)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.file_of = {key: folder / name for key, name in weight_map.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
                self.file_of = {key: folder / WEIGHTS_FILE for key in handle.keys()}  # noqa: SIM118
        else:
            raise ModelError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE} (safetensors weights are needed)")
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self.file_of)

    def _handle(self, key: str) -> Any:
        path = self.file_of[key]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return handle

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor."""
        tensor: torch.Tensor = self._handle(key).get_tensor(key)
        return tensor

    def flat_range(self, key: str, start: int, count: int) -> torch.Tensor:
        """Flat elements [start, start+count) of a tensor, reading only the dim-0 rows that hold them."""
        sl = self._handle(key).get_slice(key)
        shape = tuple(int(d) for d in sl.get_shape())
        if not shape:
            return self.get(key).reshape(-1)[start : start + count]
        first, end, offset = rows_covering(shape, start, count)
        block: torch.Tensor = sl[first:end]
        return block.reshape(-1)[offset : offset + count]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


class ShardWriter:
    """Writes tensors handed one at a time into safetensors shards of at most ``shard_bytes`` (a larger tensor gets
    a shard of its own), then names them as Hugging Face does and writes the index when there are several."""

    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".part-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index; returns the file names."""
        if self.pending or not self.written:
            self._flush()
        names = shard_file_names(len(self.written))
        weight_map: dict[str, str] = {}
        for (path, keys), name in zip(self.written, names, strict=True):
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        if len(names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return names


# ---- build and load ------------------------------------------------------------------------------------------


_HF_DS_CONFIG: Any = None
"""transformers looks its ZeRO-3 setting up through a weak reference: the run keeps the object alive."""


def build_partitioned(
    path: Path, settings: ModelSettings, ds_config: dict[str, Any], activation_checkpointing: bool = False
) -> torch.nn.Module:
    """The causal LM built under ``deepspeed.zero.Init`` from its config, its partitions filled from ``path``'s
    safetensors (each rank reads only its own rows), with LoRA adapters for technique 'lora'."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from forge_trainer.model import check_attention_implementation, prepare_for_training

    check_attention_implementation(settings.attention_implementation)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as err:
        raise ModelError(f"model.base: cannot read the model config in {path}: {err}") from err
    try:
        model_class: Any = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelError(f"model.base: {path}: {type(config).__name__} is not a causal LM") from None
    # While an HfDeepSpeedConfig with ZeRO-3 is alive, transformers' init context (the one from_pretrained uses) is
    # deepspeed.zero.Init with weight initialisation switched off: each module is partitioned as it is created and
    # nothing is initialised, since load_partitions overwrites every element. (``_from_config`` would then initialise
    # the weights one gathered module at a time: a full copy of each module on every rank, for nothing.)
    global _HF_DS_CONFIG
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    config.dtype = torch.float32
    config._attn_implementation = settings.attention_implementation
    with ExitStack() as contexts:
        for context in model_class.get_init_context(torch.float32, False, False, False):
            contexts.enter_context(context)
        model: Any = model_class(config)
    model.tie_weights()
    load_partitions(model, path)
    return prepare_for_training(model, settings, activation_checkpointing)


def load_partitions(module: torch.nn.Module, folder: Path, rename: bool = False) -> int:
    """Copy into every ZeRO-3 parameter's local partition (``ds_tensor``) its elements from ``folder``; returns the
    elements read. ``rename``: the module is peft-wrapped and ``folder`` a merged export (names mapped with
    :func:`lora_export_name`; the B adapters are zeroed, so the module computes exactly the folder's weights). A tied
    output head shares its parameter with the embedding and is read once."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    source = TensorSource(folder)
    read = 0
    try:
        with torch.no_grad():
            for name, param in module.named_parameters():
                key = lora_export_name(name) if rename else name
                full = param.data.numel() == int(param.ds_numel)  # type: ignore[attr-defined]
                if key is None:
                    if ".lora_B." in name:
                        param.ds_tensor.zero_()  # type: ignore[attr-defined]
                        if full:
                            param.data.zero_()
                    continue
                if key not in source.file_of:
                    raise ModelError(f"{folder}: no tensor {key} for the model's parameter {name}")
                part = param.ds_tensor  # type: ignore[attr-defined]
                start, count = partition_range(int(param.ds_numel), world, rank)  # type: ignore[attr-defined]
                if count:
                    part.narrow(0, 0, count).copy_(source.flat_range(key, start, count))
                if part.numel() > count:
                    part.narrow(0, count, part.numel() - count).zero_()
                read += count
                if full:
                    # a parameter the engine keeps gathered (ZeRO-3 persists small ones): its full copy too
                    param.data.copy_(source.get(key).reshape(param.data.shape))
    finally:
        source.close()
    return read


def is_partitioned(module: torch.nn.Module, world: int) -> bool:
    """Every parameter is a ZeRO-3 partition: no full data on this rank, a local partition of ceil(numel/world)."""
    for param in module.parameters():
        ds_numel = getattr(param, "ds_numel", None)
        part = getattr(param, "ds_tensor", None)
        if ds_numel is None or part is None:
            return False
        if param.data.numel() != 0 or part.numel() != math.ceil(ds_numel / world):
            return False
    return True


# ---- export ------------------------------------------------------------------------------------------------------


def _gathered_tensors(module: torch.nn.Module, lora: bool, is_main: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(export name, full tensor) of every parameter, gathered one at a time (every rank takes part; only rank 0
    gets tensors). LoRA layers are gathered with their adapters and merged: W + scaling * B @ A."""
    import deepspeed

    params = dict(module.named_parameters())
    for name, param in params.items():
        key = lora_export_name(name) if lora else name
        if key is None:
            continue
        if lora and name.endswith(".base_layer.weight"):
            layer: Any = module.get_submodule(name[: -len(".base_layer.weight")])
            adapters = [(layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]) for a in layer.lora_A]
            group = [param, *(t for a, b, _ in adapters for t in (a, b))]
            with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                if is_main:
                    weight = param.data.float().clone()
                    for a, b, scale in adapters:
                        weight += scale * (b.data.float() @ a.data.float())
                    yield key, weight.to(param.dtype)
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main:
                yield key, param.data.clone()


def export_partitioned(
    module: torch.nn.Module,
    out_dir: Path,
    tokenizer: Any,
    is_main: bool,
    lora: bool = False,
    shard_bytes: int | None = None,
) -> None:
    """A Hugging Face folder from a ZeRO-3 module (every rank calls it): parameters gathered one at a time, written
    by rank 0 into shards as they fill. LoRA adapters are merged into their layers, so the folder is a plain model.

    A write that fails on rank 0 (a full or read-only disk) does not end its part in the gathers: the other ranks
    are in them too and would wait for the collective timeout. Rank 0 gathers to the end, then raises the error."""
    inner: Any = module
    writer: ShardWriter | None = None
    failure: Exception | None = None
    if is_main:
        try:
            writer = ShardWriter(out_dir, shard_bytes or shard_bytes_setting())
        except Exception as err:
            failure = err
    for key, tensor in _gathered_tensors(inner, lora, is_main):
        if writer is None or failure is not None:
            continue
        try:
            writer.add(key, tensor)
        except Exception as err:
            failure = err
    if failure is not None:
        raise failure
    if writer is None:
        return
    writer.finish()
    config: Any = (inner.get_base_model() if lora else inner).config
    training_value = config.use_cache
    config.use_cache = True
    try:
        config.save_pretrained(str(out_dir))
    finally:
        config.use_cache = training_value
    generation: Any = getattr(inner.get_base_model() if lora else inner, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def stream_folder(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, shard_bytes: int) -> list[str]:
    """Write (name, tensor) pairs into a sharded safetensors folder as they come; returns the file names."""
    writer = ShardWriter(out_dir, shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    return writer.finish()
