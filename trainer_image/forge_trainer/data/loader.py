"""From the config to per-rank step batches: preflight checks, the mixer, rank slices, prefetching, eval sets."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from forge_trainer import storage
from forge_trainer.config import DataSettings, Source, TrainerConfig
from forge_trainer.data.encode import DocEncoder, IdArray, MaskArray
from forge_trainer.data.holdout import HoldOut
from forge_trainer.data.mixer import DOMAIN, GENERAL, Mixer, MixReport, integer_shares, mix_report, source_states
from forge_trainer.data.pack import PackedSource, SourceLimits, SourceState
from forge_trainer.data.shards import Gather, PrepareStats, ShardCache, ShardIndex, ShardReader, prepare
from forge_trainer.data.sources import SourceFiles, resolve_source
from forge_trainer.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PREPARE_TIMEOUT_ENV = "FORGE_PREPARE_TIMEOUT_S"
# Sources up to this size are tokenised whole at start, so "too small for its share" fails before training.
PREFLIGHT_COUNT_BYTES = 32 << 20


@dataclass(frozen=True)
class MixPlan:
    """The training sources in mixer order (domain first) with their group, share, resolved files and the
    per-mille of their documents held out for evaluation (0: none)."""

    sources: list[Source]
    groups: list[str]
    shares: list[int]
    files: list[SourceFiles]
    shards: ShardIndex | None = None
    hold_out: tuple[int, ...] = ()
    mix_by: str = "tokens"

    def fingerprint(self, seed: int, seq_len: int) -> str:
        """Identifies the stream: a data state only resumes the stream it came from."""
        desc = [(s.uri, s.weight, g, sh) for s, g, sh in zip(self.sources, self.groups, self.shares, strict=True)]
        stream: dict[str, Any] = {"sources": desc, "seed": seed, "seqLength": seq_len}
        # Absent at their defaults, so that earlier data states still resume.
        if any(self.hold_out):
            stream["holdOut"] = list(self.hold_out)
        if self.mix_by != "tokens":
            stream["mixBy"] = self.mix_by
        raw = json.dumps(stream, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def source_hold_out(self, i: int) -> HoldOut | None:
        """The training side of source i's hold-out split (None: nothing held out)."""
        per_mille = self.hold_out[i] if i < len(self.hold_out) else 0
        return HoldOut(per_mille, held_out=False) if per_mille else None

    def source_id(self, i: int) -> str:
        """Stable id of source i within the plan (seeds its file order)."""
        return f"{self.groups[i]}/{i}"

    def source_shards(self, i: int) -> list[ShardReader] | None:
        """Source i's prepared token shards (None: it is tokenised while it streams)."""
        return None if self.shards is None else self.shards.for_source(self.files[i])


def plan_mix(data: DataSettings, shards: ShardIndex | None = None, hold_out: tuple[int, int] = (0, 0)) -> MixPlan:
    """Resolve every training source's files; at domainPercent 100 general sources are not used. With ``shards``
    (the preparation phase's index) sources are read from their token shards. ``hold_out``: the per-mille of the
    (domain, general) documents held out for evaluation, which training skips (TrainerConfig.hold_out)."""
    general = data.general if data.domain_percent < 100 else []
    sources = [*data.domain, *general]
    groups = [DOMAIN] * len(data.domain) + [GENERAL] * len(general)
    shares = integer_shares([s.weight for s in data.domain], [s.weight for s in general], data.domain_percent)
    files = [resolve_source(s.uri) for s in sources]
    per_source = tuple(hold_out[0] if g == DOMAIN else hold_out[1] for g in groups)
    return MixPlan(sources, groups, shares, files, shards, per_source, data.mix_by)


def needed_sequences(plan: MixPlan, total_sequences: int) -> list[int]:
    """Upper bound of the sequences each source gives over the run (round robin is within one of exact)."""
    total = sum(plan.shares)
    return [math.ceil(total_sequences * s / total) + 1 for s in plan.shares]


def limits(data: DataSettings, single_pass: bool = False) -> SourceLimits:
    """Per-source limits from the config."""
    return SourceLimits(data.max_repetition, data.max_bad_lines, single_pass, data.max_record_bytes)


def preflight(plan: MixPlan, cfg: TrainerConfig, encoder: DocEncoder, total_sequences: int) -> None:
    """Fail before training on sources that are empty, malformed or too small for their share.

    Sources up to PREFLIGHT_COUNT_BYTES are tokenised whole; larger ones only have their first record read
    here, and are checked as they stream.
    """
    data = cfg.data
    for i, need in enumerate(needed_sequences(plan, total_sequences)):
        src = PackedSource(
            plan.files[i],
            plan.source_id(i),
            encoder,
            data.seq_length,
            cfg.training.seed,
            limits(data),
            shards=plan.source_shards(i),
            hold_out=plan.source_hold_out(i),
        )
        if plan.files[i].total_bytes > PREFLIGHT_COUNT_BYTES:
            src.next_sequence()
            continue
        tokens = src.count_pass_tokens()
        need_tokens = need * data.seq_length
        if need_tokens > data.max_repetition * tokens:
            raise DataError(
                f"source {plan.sources[i].uri}: insufficient tokens: it holds {tokens} tokens; its share of "
                f"{total_sequences} sequences x {data.seq_length} tokens needs up to {need_tokens} tokens "
                f"({need_tokens / tokens:.1f} passes > data.maxRepetition={data.max_repetition:g})"
            )
        log.info(
            "source %s: %d tokens per pass, needs %.2f passes, %d bad records skipped (data.maxBadLines=%d)",
            plan.sources[i].uri,
            tokens,
            need_tokens / tokens,
            src.counters.bad_lines,
            data.max_bad_lines,
        )


def token_cache(cfg: TrainerConfig) -> ShardCache:
    """data.tokenCache (default <checkpoints.output>/token-cache/), with S3 shards copied under the local dir."""
    uri = cfg.data.token_cache or storage.join(cfg.checkpoints.output, "token-cache")
    return ShardCache(uri, Path(cfg.checkpoints.local_dir) / "token-cache")


def prepare_shards(
    plan: MixPlan, cfg: TrainerConfig, encoder: DocEncoder, rank: int, world: int, gather: Gather
) -> tuple[ShardIndex, PrepareStats]:
    """The preparation phase: every training file tokenised once over the ranks (or found in the cache).
    Returns the index and the job's summed figures."""
    files = [f for src in plan.files for f in src.files]
    index, per_rank = prepare(files, encoder, token_cache(cfg), cfg.data.max_record_bytes, rank, world, gather)
    total = PrepareStats()
    for st in per_rank:
        total.add(st)
    return index, total


def rank_gather(world_size: int) -> Gather:
    """All-gather of a picklable object over the job's ranks, for the prepare phase: a gloo group of its own whose
    timeout (FORGE_PREPARE_TIMEOUT_S, default 86400) covers tokenising a rank's share of the files."""
    if world_size == 1 or not dist.is_initialized():
        return lambda obj: [obj]
    timeout = datetime.timedelta(seconds=float(os.environ.get(PREPARE_TIMEOUT_ENV, "86400")))
    group = dist.new_group(backend="gloo", timeout=timeout)

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    return gather


def prepare_phase(
    plan: MixPlan, cfg: TrainerConfig, encoder: DocEncoder, rank: int, world_size: int
) -> tuple[MixPlan, PrepareStats, float]:
    """The prepare phase (data.cacheTokens): the plan reading token shards, the job's figures and the seconds."""
    started = time.perf_counter()
    index, total = prepare_shards(plan, cfg, encoder, rank, world_size, rank_gather(world_size))
    seconds = time.perf_counter() - started
    log.info(
        "prepare phase: %d file(s), %d tokenised (%d records, %d tokens) and %d reused by %d rank(s) in %.1f s",
        total.files,
        total.built,
        total.records,
        total.tokens,
        total.reused,
        world_size,
        seconds,
    )
    return dataclasses.replace(plan, shards=index), total, seconds


def build_mixer(plan: MixPlan, cfg: TrainerConfig, encoder: DocEncoder, state: dict[str, Any] | None = None) -> Mixer:
    """The training mixer, fresh or resumed from a data state."""
    if state is not None:
        expect = plan.fingerprint(cfg.training.seed, cfg.data.seq_length)
        if state.get("fingerprint") != expect:
            raise DataError(
                "data.domain/data.general/data.seqLength/data.mixBy/training.seed changed since the checkpoint: its "
                "data state cannot resume this stream (use a new output location to start over)"
            )
    states: list[SourceState | None] = source_states(state, len(plan.sources))
    packed = [
        PackedSource(
            plan.files[i],
            plan.source_id(i),
            encoder,
            cfg.data.seq_length,
            cfg.training.seed,
            limits(cfg.data),
            st,
            shards=plan.source_shards(i),
            hold_out=plan.source_hold_out(i),
        )
        for i, st in enumerate(states)
    ]
    return Mixer(packed, plan.groups, plan.shares, state, by_loss_tokens=plan.mix_by == "lossTokens")


def plan_report(plan: MixPlan, state: dict[str, Any]) -> MixReport:
    """The realised mix at a data state."""
    return mix_report(state, plan.groups, plan.shares, [s.uri for s in plan.sources])


def data_state(mixer: Mixer, plan: MixPlan, cfg: TrainerConfig) -> dict[str, Any]:
    """The mixer state plus the stream fingerprint."""
    st = mixer.state()
    st["fingerprint"] = plan.fingerprint(cfg.training.seed, cfg.data.seq_length)
    return st


@dataclass(frozen=True)
class Layout:
    """How the global stream is split: per step, micro-batch m of rank r is a contiguous block."""

    world_size: int
    rank: int
    micro_batch: int
    accumulation: int

    @property
    def step_sequences(self) -> int:
        """Global sequences per optimizer step."""
        return self.world_size * self.micro_batch * self.accumulation

    def owner(self, index_in_step: int) -> tuple[int, int]:
        """(rank, micro-batch) that trains the sequence at this index of the step."""
        block = index_in_step // self.micro_batch
        return block % self.world_size, block // self.world_size


class MicroBatch(NamedTuple):
    """Model inputs of one micro-batch."""

    ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    """Position ids restarting at every document (attention stays inside documents); None: plain causal attention
    over the whole sequence."""


@dataclass
class StepBatch:
    """One optimizer step for one rank: its micro-batches, and the data state after the whole step."""

    step: int
    micro: list[MicroBatch]
    state: dict[str, Any]
    global_loss_tokens: int


def to_tensors(seqs: list[tuple[IdArray, MaskArray | None]], pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels (IGNORE_INDEX where no loss) for a micro-batch; ``pin`` for async copies to a GPU."""
    ids = torch.from_numpy(np.stack([s[0] for s in seqs]).astype(np.int64))
    labels = ids.clone()
    for row, (_, mask) in enumerate(seqs):
        if mask is not None:
            labels[row, torch.from_numpy(~mask)] = IGNORE_INDEX
    if pin:
        return ids.pin_memory(), labels.pin_memory()
    return ids, labels


def to_micro_batch(seqs: list[tuple[IdArray, MaskArray | None, IdArray | None]], pin: bool = False) -> MicroBatch:
    """A micro-batch's tensors; position ids only when every sequence has them."""
    ids, labels = to_tensors([(s[0], s[1]) for s in seqs], pin)
    rows = [s[2] for s in seqs if s[2] is not None]
    if len(rows) < len(seqs):
        return MicroBatch(ids, labels, None)
    positions = torch.from_numpy(np.stack(rows).astype(np.int64))
    return MicroBatch(ids, labels, positions.pin_memory() if pin else positions)


def labelled_positions(mask: MaskArray | None, seq_len: int) -> int:
    """Next-token positions of a sequence that carry loss (position 0 predicts nothing)."""
    return seq_len - 1 if mask is None else int(mask[1:].sum())


def positions(fragment_positions: IdArray, cfg: TrainerConfig) -> IdArray | None:
    """The position ids a sequence trains with: per document, unless data.crossDocumentAttention."""
    return None if cfg.data.cross_document_attention else fragment_positions


def step_batches(
    mixer: Mixer, plan: MixPlan, cfg: TrainerConfig, layout: Layout, first_step: int
) -> Iterator[StepBatch]:
    """Endless step batches for ``layout.rank``; every rank walks the same global stream and keeps its slice."""
    step = first_step
    pin = torch.cuda.is_available()
    while True:
        mine: list[list[tuple[IdArray, MaskArray | None, IdArray | None]]] = [[] for _ in range(layout.accumulation)]
        loss_tokens = 0
        for j in range(layout.step_sequences):
            seq = mixer.next()
            loss_tokens += labelled_positions(seq.mask, cfg.data.seq_length)
            rank, micro = layout.owner(j)
            if rank == layout.rank:
                mine[micro].append((seq.ids, seq.mask, positions(seq.positions, cfg)))
        tensors = [to_micro_batch(m, pin=pin) for m in mine]
        yield StepBatch(step, tensors, data_state(mixer, plan, cfg), loss_tokens)
        step += 1


_END = object()


class Prefetcher:
    """Builds step batches in a background thread (tokenisation overlaps the device's work).

    Errors raised while building (DataError) are re-raised in the consumer at the step they belong to.
    """

    def __init__(self, batches: Iterator[StepBatch], depth: int = 2) -> None:
        self._batches = batches
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forge-data", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:
            self._queue.put(err)
        else:
            self._queue.put(_END)

    def next(self) -> StepBatch:
        """The next step batch (blocks while it is being built)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise StopIteration
        assert isinstance(item, StepBatch)
        return item

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
            self._thread.join(timeout=0.1)
