"""The training loss with full logits vs the chunked linear cross-entropy: peak memory and time of a step (CPU).

One forward + backward of a Llama-shaped model with a real vocabulary (the part the loss changes: the output
projection and the cross-entropy), each variant in its own process so that its peak resident memory is its own:

- full: the model's logits for the whole micro-batch, cast to fp32, then cross-entropy (the path before issue 16);
- chunked-N: forge_trainer.engine.ChunkedLinearCrossEntropy, N positions at a time (gradients computed in the
  forward pass, no recomputation);
- checkpoint-N: the same chunks through torch.utils.checkpoint (the logits of each chunk recomputed in the backward
  pass), the simplest alternative.

Printed per variant: the peak resident memory above the process's memory before the first step (model, batch and
allocator state), and the median step time. Timings on a shared machine are noisy: compare within one run.

Usage: .venv/bin/python benchmarks/trainer_loss_chunks.py [--vocab 32000] [--seq 1024] [--micro 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as nnf
from torch.utils.checkpoint import checkpoint

from forge_trainer.data.loader import IGNORE_INDEX
from forge_trainer.engine import output_head, token_loss_sum


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _checkpointed_loss(model: Any, ids: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    out = model(input_ids=ids, logits_to_keep=torch.zeros(0, dtype=torch.long), output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1, :].reshape(-1, out.hidden_states[-1].shape[-1])
    y = labels[:, 1:].reshape(-1)
    weight = output_head(model).weight

    def part(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nnf.cross_entropy(nnf.linear(h, w).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")

    total = torch.zeros(())
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part, hidden[s : s + chunk], weight, y[s : s + chunk], use_reentrant=False)
    return total


def child(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    ids = torch.randint(0, args.vocab, (args.micro, args.seq))
    labels = ids.clone()
    kind, _, n = args.variant.partition("-")
    chunk = int(n or 0)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if kind == "checkpoint":
            total = _checkpointed_loss(model, ids, labels, chunk)
        else:
            total, _ = token_loss_sum(model, ids, labels, chunk if kind == "chunked" else 0)
        total.backward()
        return float(total.detach())

    base = _rss_kib()
    times, loss = [], 0.0
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": args.variant,
        "peakAboveBaseMiB": round((peak - base) / 1024, 1),
        "stepSeconds": round(statistics.median(times), 3),
        "loss": loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="full,chunked-1024,chunked-4096,checkpoint-1024")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    tokens = args.micro * args.seq
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, micro-batch {args.micro} x seq {args.seq} "
        f"({tokens} positions; fp32 logits {logits_mib:.0f} MiB), {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'variant':<18} {'peak above base MiB':>20} {'step s':>8} {'loss':>12}")
    for variant in args.variants.split(","):
        argv = [sys.executable, __file__, "--variant", variant]
        for key in ("vocab", "hidden", "layers", "seq", "micro", "steps", "threads"):
            argv += [f"--{key}", str(getattr(args, key))]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        print(f"{variant:<18} {row['peakAboveBaseMiB']:>20} {row['stepSeconds']:>8} {row['loss']:>12.4f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
