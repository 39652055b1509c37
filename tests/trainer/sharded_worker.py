"""One rank that builds the model partitioned and records what it holds (``python -m tests.trainer.sharded_worker
CONFIG OUT``, with the Kubeflow rank environment). Rank r writes OUT.r (JSON): for every parameter its full size
(ds_numel), this rank's local partition size and data size, right after the build and before any engine exists; and
whether each parameter, gathered, equals the tensor in the base model's safetensors file. With a third argument
EXPORT, every rank then takes part in the streamed hf/ export into the folder EXPORT (rank 0 writes it) and records
the export's outcome."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(config_path: str, out: str, export: str | None = None) -> None:
    import deepspeed

    from forge_trainer.config import load_config
    from forge_trainer.engine import deepspeed_config, dist_env, init_distributed
    from forge_trainer.model import load_tokenizer
    from forge_trainer.sharded import TensorSource, build_partitioned, export_partitioned, is_partitioned

    cfg = load_config(Path(config_path))
    denv = dist_env()
    init_distributed(denv, 120)
    base = Path(cfg.model.base)
    model = build_partitioned(base, cfg.model, deepspeed_config(cfg, denv.world_size))
    params = {
        name: {"dsNumel": int(p.ds_numel), "partition": int(p.ds_tensor.numel()), "data": int(p.data.numel())}
        for name, p in model.named_parameters()
    }
    source = TensorSource(base)
    equal: dict[str, bool] = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            equal[name] = bool(torch.equal(p.data.float(), source.get(name).float()))
    record: dict[str, object] = {
        "partitioned": is_partitioned(model, denv.world_size),
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        "params": params,
        "equal": equal,
    }
    if export is not None:
        try:
            export_partitioned(model, Path(export), load_tokenizer(base), denv.rank == 0)
            record["export"] = "done"
        except Exception as err:
            record["export"] = f"{type(err).__name__}: {err}"
    Path(f"{out}.{denv.rank}").write_text(json.dumps(record))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # As forge_trainer.train.entry does: interpreter teardown can abort on CPU ("terminate called without an active
    # exception" from the communication library's threads) after the work is done and recorded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
