"""Mixer throughput on one core.

1. Pre-tokenised input: documents are token arrays already (no reading, no tokeniser); this measures packing,
   token-exact mixing and cutting one rank's micro-batches into tensors.
2. Tokeniser-bound: the real path from jsonl files through the base model's fast tokenizer (a locally trained
   byte-level BPE), packing and mixing.

Every rank walks the whole global stream and keeps its slice, so the figure that bounds training is
"global stream tokens/s": the job's total tokens/s must stay below it (per rank, it runs in a background thread).

Usage: .venv/bin/python benchmarks/trainer_mixer.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from forge_trainer import tiny
from forge_trainer.config import TrainerConfig
from forge_trainer.data.encode import Doc, DocEncoder, Encoded
from forge_trainer.data.loader import Layout, build_mixer, plan_mix, step_batches
from forge_trainer.data.mixer import Mixer, integer_shares
from forge_trainer.data.pack import PackedSource, SourceLimits
from forge_trainer.data.records import Position
from forge_trainer.data.sources import SourceFile, SourceFiles
from forge_trainer.model import load_tokenizer


class PretokenisedSource(PackedSource):
    """A PackedSource fed from token arrays already in memory (the tokeniser is out of the loop)."""

    def __init__(self, docs: list[Doc], seq_len: int, name: str) -> None:
        files = SourceFiles(name, (SourceFile(name, 0, "jsonl"),))
        super().__init__(files, name, None, seq_len, 0, SourceLimits(max_repetition=1e9))  # type: ignore[arg-type]
        self._docs = docs
        self._i = 0

    def _fill(self) -> None:
        for _ in range(64):
            doc = self._docs[self._i % len(self._docs)]
            pos = Position(0, 0, self._i + 1, 0)
            self._items.append(Encoded(self.files.uri, pos, doc))
            self._i += 1


def pretokenised_docs(n: int, vocab: int, seed: int) -> list[Doc]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, 3000, size=n)
    return [Doc(rng.integers(0, vocab, size=int(k), dtype=np.int32), None) for k in lengths]


def bench_pretokenised(seconds: float, seq_len: int, world: int, micro: int) -> None:
    sources = [PretokenisedSource(pretokenised_docs(500, 32000, s), seq_len, f"mem://{s}") for s in range(4)]
    mixer = Mixer(sources, ["domain", "domain", "general", "general"], integer_shares([3, 1], [1, 1], 70))
    # Mixer alone (global stream).
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(256):
            mixer.next()
        n += 256
    dt = time.perf_counter() - t0
    print(f"pre-tokenised, mixer only (seq {seq_len}): {n * seq_len / dt / 1e6:8.1f} M tokens/s of global stream")

    # What one rank does per step: walk the global stream, keep its slice, build tensors, save the state.
    plan = _Plan(["domain", "domain", "general", "general"], mixer)
    layout = Layout(world, 0, micro, 1)
    batches = step_batches(mixer, plan, _cfg(seq_len), layout, 0)  # type: ignore[arg-type]
    steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(batches)
        steps += 1
    dt = time.perf_counter() - t0
    tokens = steps * layout.step_sequences * seq_len
    print(
        f"pre-tokenised, rank loader (world {world}, micro {micro}): {tokens / dt / 1e6:8.1f} M tokens/s of global "
        f"stream = {tokens / dt / world / 1e6:.2f} M tokens/s trained by this rank"
    )


class _Plan:
    """The parts of MixPlan that step_batches uses."""

    def __init__(self, groups: list[str], mixer: Mixer) -> None:
        self.groups = groups
        self.sources = [_Src(s.uri) for s in mixer.sources]
        self.shares = mixer.shares

    def fingerprint(self, seed: int, seq_len: int) -> str:
        return "bench"


class _Src:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.weight = 1


def _cfg(seq_len: int, domain: str = "/dev/null", general: str = "/dev/null") -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "version": 1,
            "jobName": "bench",
            "namespace": "bench",
            "model": {"base": "/dev/null", "technique": "cpt"},
            "data": {
                "domainPercent": 70,
                "domain": [{"uri": domain}],
                "general": [{"uri": general}],
                "seqLength": seq_len,
                "maxRepetition": 1000,
            },
            "training": {"learningRate": 1e-4, "microBatchSize": 1, "maxSteps": 1},
            "checkpoints": {"everySteps": 1, "output": "/dev/null"},
        }
    )


def bench_tokeniser(seconds: float, seq_len: int, workdir: Path) -> None:
    model = tiny.make_model_folder(workdir / "model")
    tok: Any = load_tokenizer(model)
    rng = random.Random(0)
    for kind, n in (("domain", 20000), ("general", 20000)):
        path = workdir / kind / "data.jsonl"
        path.parent.mkdir(parents=True)
        with open(path, "w") as fh:
            for _ in range(n):
                gen = tiny.domain_text if kind == "domain" else tiny.general_text
                fh.write('{"text": "' + " ".join(gen(rng) for _ in range(8)) + '"}\n')
    cfg = _cfg(seq_len, str(workdir / "domain"), str(workdir / "general"))
    plan = plan_mix(cfg.data)
    mixer = build_mixer(plan, cfg, DocEncoder(tok, assistant_only=False))
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(32):
            mixer.next()
        n += 32
    dt = time.perf_counter() - t0
    print(
        f"tokeniser-bound (jsonl -> byte-level BPE, vocab {len(tok)}, seq {seq_len}): "
        f"{n * seq_len / dt / 1e6:8.2f} M tokens/s of global stream"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(1)
    print(f"one core (pid {os.getpid()}), {args.seconds:g} s per figure")
    bench_pretokenised(args.seconds, 2048, world=8, micro=8)
    bench_pretokenised(args.seconds, 128, world=2, micro=8)
    with tempfile.TemporaryDirectory() as tmp:
        bench_tokeniser(args.seconds, 2048, Path(tmp))


if __name__ == "__main__":
    main()
