"""Attention inside documents against plain causal attention over packed sequences: speed and loss.

Packs a general held-out set into sequences of ``--seq`` tokens with forge_trainer's own packer, then measures with
one model, on the same tokens:

* the held-out loss (nats per labelled token) of the unchanged model, with per-document position ids (attention stays
  inside each document, the default) and without them (a document attends to the ones before it in its sequence,
  ``data.crossDocumentAttention: true``);
* the wall time of a training step (forward, backward, AdamW) on one micro-batch, both ways, per attention kernel.

``--model`` takes any Hugging Face folder (e.g. the real SmolLM2-135M built by forge_dev); by default the cached
tiny Llama of forge_dev.basemodel. Prints a Markdown table; nothing is asserted.

Usage: .venv/bin/python benchmarks/attention_documents.py [--model DIR] [--seq 256] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from eval_cost import timed  # the sibling benchmark's median-of-repeats timer (scripts run from benchmarks/)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF model folder (default: forge_dev's tiny base model)")
    ap.add_argument("--eval-data", type=Path, default=None, help="jsonl of {'text': ...} (default: its general set)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--implementations", default="sdpa,eager")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from forge_trainer.config import Source, TrainerConfig
    from forge_trainer.data.encode import DocEncoder
    from forge_trainer.data.loader import to_micro_batch
    from forge_trainer.heldout import EvalSeq, eval_sequences, evaluate_set
    from forge_trainer.model import load_tokenizer, pad_token_id

    hf_logging.disable_progress_bar()
    model_dir, eval_data = a.model, a.eval_data
    if model_dir is None or eval_data is None:
        from forge_dev.basemodel import build_base_model

        base = build_base_model()
        model_dir = model_dir or base.folder
        eval_data = eval_data or base.general / "eval.jsonl"
    cfg = TrainerConfig.model_validate(
        {
            "version": 1,
            "jobName": "bench",
            "namespace": "bench",
            "model": {"base": str(model_dir), "technique": "cpt"},
            "data": {"domainPercent": 100, "domain": [{"uri": str(eval_data)}], "seqLength": a.seq},
            "training": {"learningRate": 1e-5, "microBatchSize": a.micro_batch, "maxSteps": 1},
            "checkpoints": {"everySteps": 1, "output": "/tmp/unused"},
        }
    )
    tokenizer = load_tokenizer(model_dir)
    encoder = DocEncoder(tokenizer, False)
    seqs = eval_sequences([Source(uri=str(eval_data))], a.eval_sequences * a.seq, cfg, encoder, pad_token_id(tokenizer))
    flat = [EvalSeq(s.ids, s.mask, s.source, None) for s in seqs]
    starts = sum(int((s.positions == 0).sum()) for s in seqs if s.positions is not None)
    cpu = torch.device("cpu")
    print(
        f"model {model_dir}, seq {a.seq}, {len(seqs)} held-out sequences ({starts} document starts, "
        f"{starts / max(1, len(seqs)):.1f} per sequence), micro-batch {a.micro_batch}, {a.threads} threads, "
        f"median of {a.repeats}\n"
    )
    print("| kernel | held-out loss, per document | across documents | train step, per document | across documents |")
    print("| --- | --- | --- | --- | --- |")
    batch = [(s.ids, s.mask, s.positions) for s in seqs[: a.micro_batch]]
    inside, across = to_micro_batch(batch), to_micro_batch([(i, m, None) for i, m, _ in batch])
    for implementation in a.implementations.split(","):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation=implementation
        )
        model.config.use_cache = False
        loss_inside = evaluate_set(model, cpu, seqs, 1, a.micro_batch, 0, 1)[0].mean
        loss_across = evaluate_set(model, cpu, flat, 1, a.micro_batch, 0, 1)[0].mean
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(mb: Any, model: Any = model, optimizer: Any = optimizer) -> None:
            model.train()
            out = model(input_ids=mb.ids, position_ids=mb.positions, labels=mb.labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        t_inside = timed(lambda: step(inside), a.repeats)
        t_across = timed(lambda: step(across), a.repeats)
        print(
            f"| {implementation} | {loss_inside:.4f} | {loss_across:.4f} | {t_inside * 1e3:.0f} ms "
            f"| {t_across * 1e3:.0f} ms ({t_inside / t_across:.2f}x) |"
        )


if __name__ == "__main__":
    main()
