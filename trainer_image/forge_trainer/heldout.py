"""Held-out evaluation: token-mean losses per set and per source, and KL(base || model) on general tokens.

The KL needs the base model's next-token distribution at every labelled position. Keeping it whole would cost
``positions x vocabulary`` floats, so the baseline pass keeps only the base's top-k log-probabilities (and their
token ids) per position; later passes compare the model's log-probabilities on those k tokens plus one bucket
holding everything else. Coarsening both distributions the same way can only lower the KL, so the figure is a lower
bound of the full KL(base || model), tight when the base puts most of its mass on its top k tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf

from forge_trainer.config import Source, TrainerConfig
from forge_trainer.data.encode import DocEncoder, IdArray, MaskArray
from forge_trainer.data.holdout import HoldOut
from forge_trainer.data.loader import IGNORE_INDEX, limits, positions, to_micro_batch
from forge_trainer.data.pack import PackedSource, SourceExhaustedError
from forge_trainer.data.sources import resolve_source

# Probability mass below this counts as zero in the "everything else" bucket (float32 sums of k probabilities
# land a few ulps off 1).
_MASS_FLOOR = 1e-12


@dataclass(frozen=True)
class EvalSeq:
    """One fixed held-out sequence and the index of the source (within its group) it was cut from."""

    ids: IdArray
    mask: MaskArray | None
    source: int
    positions: IdArray | None = None
    """Position ids restarting at each document (None: attention over the whole sequence), as in training."""


@dataclass(frozen=True)
class TopK:
    """The base model's top-k next-token log-probabilities at the labelled positions of one sequence (on CPU)."""

    logp: torch.Tensor  # [positions, k] float32
    index: torch.Tensor  # [positions, k] int64


# The cache of one rank: TopK by the sequence's index in its set.
KLCache = dict[int, TopK]

# Mean loss of each of one rank's sequences, by the sequence's index in its set.
SequenceLosses = dict[int, float]


@dataclass(frozen=True)
class SetLosses:
    """Figures of one held-out set: the token-mean loss, the same per source (None: no labelled token), the mean
    KL(base || model) per labelled token in nats (None: not measured), this rank's per-sequence mean losses, and the
    standard error of the mean per-sequence loss difference to the base (None: no base losses given, or < 2
    sequences)."""

    mean: float | None
    per_source: list[float | None]
    kl: float | None = None
    sequences: SequenceLosses | None = None
    paired_stderr: float | None = None


def eval_sequences(
    sources: list[Source],
    max_tokens: int,
    cfg: TrainerConfig,
    encoder: DocEncoder,
    pad_id: int,
    hold_out_per_mille: int = 0,
) -> list[EvalSeq]:
    """A fixed held-out set: from each source (one pass, no repetition) its weight's share of ``max_tokens``.

    The separator tokens Forge adds around documents carry no loss here (only the data is scored). With
    ``hold_out_per_mille`` > 0 the sources are training sources and only their held-out documents are read
    (data/holdout.py; TrainerConfig.eval_group gives both)."""
    seq_len = cfg.data.seq_length
    total_w = sum(s.weight for s in sources)
    scoring = encoder.for_evaluation()
    hold_out = HoldOut(hold_out_per_mille, held_out=True) if hold_out_per_mille else None
    out: list[EvalSeq] = []
    for i, src in enumerate(sources):
        n = max(1, (max_tokens * src.weight // total_w) // seq_len)
        packed = PackedSource(
            resolve_source(src.uri),
            f"eval/{i}",
            scoring,
            seq_len,
            cfg.training.seed,
            limits(cfg.data, True),
            hold_out=hold_out,
        )
        for _ in range(n):
            try:
                seq = packed.next_sequence(pad_id)
            except SourceExhaustedError:
                break
            out.append(EvalSeq(seq.ids, seq.mask, i, positions(seq.positions, cfg)))
    return out


def topk_kl_sum(base_logp: torch.Tensor, base_index: torch.Tensor, model_logp: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(base || model) on the base's top-k tokens plus one bucket for the rest.

    ``base_logp``/``base_index``: [positions, k]; ``model_logp``: [positions, vocabulary] log-probabilities.
    """
    q_logp = model_logp.gather(-1, base_index)
    p = base_logp.exp()
    head = (p * (base_logp - q_logp)).sum(-1)
    rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)
    rest_q = (1.0 - q_logp.exp().sum(-1)).clamp_min(_MASS_FLOOR)
    tail = torch.where(
        rest_p > _MASS_FLOOR, rest_p * (rest_p.clamp_min(_MASS_FLOOR).log() - rest_q.log()), torch.zeros_like(rest_p)
    )
    return (head + tail).sum()


@torch.no_grad()
def evaluate_set(
    module: torch.nn.Module,
    device: torch.device,
    seqs: list[EvalSeq],
    n_sources: int,
    micro_batch: int,
    rank: int,
    world_size: int,
    kl_cache: KLCache | None = None,
    build_top_k: int = 0,
    base_losses: SequenceLosses | None = None,
) -> tuple[SetLosses, KLCache | None]:
    """Evaluate a fixed set split over ranks (every rank must call it with the same set).

    With ``kl_cache`` (this rank's, from the baseline pass) the KL to the base is measured; with ``build_top_k`` > 0
    this pass is the base model's and returns the cache for this rank's sequences. With ``base_losses`` (this rank's
    per-sequence losses of the base model) the standard error of the loss difference is measured: paired on the
    same sequences, so the noise of the held-out sample cancels and what is left is how consistently the loss moved.
    """
    if not seqs:
        return SetLosses(None, [None] * n_sources), ({} if build_top_k else None)
    was_training = module.training
    module.eval()
    # rows 0..n_sources-1: (loss sum, labelled tokens) per source; last row: (KL sum, positions with a KL term)
    sums = torch.zeros(n_sources + 1, 2, device=device, dtype=torch.float64)
    mine = list(range(rank, len(seqs), world_size))
    # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank with no
    # sequences left runs one whose labels are all ignored.
    per_rank = math.ceil(len(seqs) / world_size)
    dummy = (seqs[0].ids, np.zeros_like(seqs[0].ids, dtype=np.bool_), seqs[0].positions)
    built: KLCache | None = {} if build_top_k else None
    sequences: SequenceLosses = {}
    # (sum of differences to the base, sum of their squares, sequences), per-sequence means
    paired = torch.zeros(3, device=device, dtype=torch.float64)
    for start in range(0, per_rank, micro_batch):
        chunk = mine[start : start + micro_batch]
        batch = [(seqs[i].ids, seqs[i].mask, seqs[i].positions) for i in chunk] or [dummy]
        ids, labels, position_ids = to_micro_batch(batch)
        position_ids = None if position_ids is None else position_ids.to(device)
        # use_cache=False: with a KV cache transformers ignores the per-document position ids' block-causal mask (an
        # export's config.json says use_cache: true, for serving).
        logits = module(input_ids=ids.to(device), position_ids=position_ids, use_cache=False).logits[:, :-1, :].float()
        target = labels[:, 1:].to(device)
        token_loss = nnf.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(target.shape)
        for row, index in enumerate(chunk):
            labelled = target[row] != IGNORE_INDEX
            source = seqs[index].source
            row_sum = token_loss[row][labelled].double().sum()
            row_count = labelled.sum()
            sums[source, 0] += row_sum
            sums[source, 1] += row_count
            if int(row_count) > 0:
                sequences[index] = float(row_sum) / int(row_count)
                if base_losses is not None and index in base_losses:
                    diff = sequences[index] - base_losses[index]
                    paired += torch.tensor([diff, diff * diff, 1.0], device=device, dtype=torch.float64)
            if built is None and (kl_cache is None or index not in kl_cache):
                continue
            logp = torch.log_softmax(logits[row][labelled], dim=-1)
            if built is not None:
                top = logp.topk(min(build_top_k, logp.shape[-1]), dim=-1)
                built[index] = TopK(top.values.cpu(), top.indices.cpu())
            elif kl_cache is not None:
                cached = kl_cache[index]
                sums[n_sources, 0] += topk_kl_sum(cached.logp.to(device), cached.index.to(device), logp).double()
                sums[n_sources, 1] += cached.logp.shape[0]
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        if base_losses is not None:
            torch.distributed.all_reduce(paired)
    module.train(was_training)
    counts = sums[:n_sources, 1]
    total = float(counts.sum())
    mean = float(sums[:n_sources, 0].sum()) / total if total > 0 else None
    per_source = [float(sums[i, 0] / sums[i, 1]) if sums[i, 1] > 0 else None for i in range(n_sources)]
    kl = float(sums[n_sources, 0] / sums[n_sources, 1]) if kl_cache is not None and sums[n_sources, 1] > 0 else None
    return SetLosses(mean, per_source, kl, sequences, _stderr(paired) if base_losses is not None else None), built


def _stderr(paired: torch.Tensor) -> float | None:
    """Standard error of a mean from (sum, sum of squares, count); None below two samples."""
    total, squares, n = (float(x) for x in paired)
    if n < 2:
        return None
    variance = max(0.0, (squares - total * total / n) / (n - 1))
    return math.sqrt(variance / n)
