"""The pace of training: each rank's recent step times and data waits, stragglers among the ranks, and throughput
drops of the job.

Timing is host-side (``time.perf_counter`` around the step, as the hang watchdog does): no device sync is added.
A rank's pace is its *own* compute time per step (:class:`OwnTime`): in synchronous data parallelism the backward
pass ends in the gradient all-reduce, where every rank waits for the slowest, so the step's wall time is the same on
every rank and only the part before the first collective (the forward passes and losses) tells a slow rank apart.

At each read-back (every training.logEverySteps steps) every rank adds its median own time to the read-back's
all-reduce (:meth:`PaceWatch.slots`: no collective and no device sync of its own), so every rank holds every rank's
figure and judges the same way (:meth:`PaceWatch.observe`): each sets its own straggler gauge, rank 0 reports.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from forge_trainer.errors import ConfigError

WINDOW = 20
FAULT_ENV = "FORGE_FAULT_SLEEP_PER_STEP"


class StepClock:
    """One rank's last ``window`` steps: the wait for the batch, and the step itself (forward, backward, optimizer)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._wait: deque[float] = deque(maxlen=window)
        self._compute: deque[float] = deque(maxlen=window)
        self._own: deque[float] = deque(maxlen=window)

    def add(self, wait_s: float, compute_s: float, own_s: float | None = None) -> None:
        self._wait.append(max(0.0, wait_s))
        self._compute.append(max(0.0, compute_s))
        if own_s is not None:
            self._own.append(max(0.0, own_s))

    def median_own(self) -> float | None:
        """Median own compute time (seconds) of the recent steps (:class:`OwnTime`); None before any step."""
        return statistics.median(self._own) if self._own else None

    def median_compute(self) -> float | None:
        """Median step compute time (seconds) of the recent steps; None before any step."""
        return statistics.median(self._compute) if self._compute else None

    def median_step(self) -> float | None:
        """Median wall time of the recent steps, waits included."""
        if not self._compute:
            return None
        return statistics.median(w + c for w, c in zip(self._wait, self._compute, strict=True))

    def data_wait_ratio(self) -> float | None:
        """Share of the recent steps' wall time spent waiting for the next batch (0-1)."""
        total = sum(self._wait) + sum(self._compute)
        return sum(self._wait) / total if total > 0 else None


@dataclass(frozen=True)
class PaceSettings:
    """When a rank is a straggler and when throughput has dropped (spec.monitoring)."""

    straggler_percent: int = 130
    read_backs: int = 5
    drop_percent: int = 50
    straggler_min_gap_seconds: float = 0.05
    """A straggler is also this much slower per step than the others' median: below it the gap is scheduler noise
    (steps of a few milliseconds on shared CPUs) and costs the job next to nothing."""


def slowest_over(times: list[float], percent: int, min_gap_seconds: float = 0.0) -> int | None:
    """The rank whose step time is above ``percent``% of the median of the other ranks, and at least
    ``min_gap_seconds`` above it (the slowest such rank); None when every rank is within it, or with fewer than two
    ranks."""
    if len(times) < 2:
        return None
    worst: tuple[float, int] | None = None
    for rank, own in enumerate(times):
        others = statistics.median(times[:rank] + times[rank + 1 :])
        if others > 0 and own * 100 > others * percent and own - others >= min_gap_seconds:
            ratio = own / others
            if worst is None or ratio > worst[0]:
                worst = (ratio, rank)
    return None if worst is None else worst[1]


@dataclass(frozen=True)
class Degraded:
    """A ThroughputDegraded finding: Straggler (with the rank) or ThroughputDrop."""

    reason: str
    message: str
    rank: int | None = None
    value: float = 0.0
    """The straggler's step seconds, or the job's tokens/s."""
    median: float = 0.0
    """The other ranks' median step seconds, or the job's running median tokens/s."""
    read_backs: int = 0
    """Consecutive read-backs it held for."""


class PaceJudge:
    """Rank 0's memory across read-backs: a straggler or a drop counts once it persisted ``read_backs`` times."""

    def __init__(self, settings: PaceSettings, window: int = WINDOW) -> None:
        self.settings = settings
        self._suspect: int | None = None
        self._suspect_count = 0
        self._low_count = 0
        self._throughput: deque[float] = deque(maxlen=window)

    def straggler(self, times: list[float]) -> Degraded | None:
        """Feed one read-back's per-rank median step times."""
        rank = slowest_over(times, self.settings.straggler_percent, self.settings.straggler_min_gap_seconds)
        if rank is None or rank != self._suspect:
            self._suspect, self._suspect_count = rank, (0 if rank is None else 1)
        else:
            self._suspect_count += 1
        if rank is None or self._suspect_count < self.settings.read_backs:
            return None
        others = statistics.median(times[:rank] + times[rank + 1 :])
        return Degraded(
            "Straggler",
            f"rank {rank} takes {times[rank]:.3g} s per step, {100 * times[rank] / others:.0f}% of the other ranks' "
            f"median {others:.3g} s, for {self._suspect_count} read-backs in a row",
            rank,
            times[rank],
            others,
            self._suspect_count,
        )

    def drop(self, tokens_per_second: float | None) -> Degraded | None:
        """Feed one read-back's job throughput (tokens/s). Low figures stay out of the running median: a lasting
        drop is judged against the level before it, not against itself."""
        if tokens_per_second is None or tokens_per_second <= 0:
            return None
        history = list(self._throughput)
        if len(history) < self.settings.read_backs:
            self._throughput.append(tokens_per_second)
            return None
        median = statistics.median(history)
        low = tokens_per_second * 100 < median * self.settings.drop_percent
        self._low_count = self._low_count + 1 if low else 0
        if not low:
            self._throughput.append(tokens_per_second)
        if self._low_count < self.settings.read_backs:
            return None
        return Degraded(
            "ThroughputDrop",
            f"{tokens_per_second:.4g} tokens/s is below {self.settings.drop_percent}% of the job's running median "
            f"{median:.4g} tokens/s for {self._low_count} read-backs in a row",
            value=tokens_per_second,
            median=median,
            read_backs=self._low_count,
        )


# --- a rank's own compute, the fault hook, the watch every rank keeps ---------------------------------------------


@dataclass(frozen=True)
class Fault:
    """The test-only slowdown of FORGE_FAULT_SLEEP_PER_STEP: this rank sleeps ``seconds`` in each step's own compute
    from step ``from_step`` on."""

    seconds: float = 0.0
    from_step: int = 1


def parse_fault(raw: str | None, rank: int) -> Fault:
    """``RANK:SECONDS[:FROM_STEP]`` (e.g. ``1:0.5``): the fault of this rank (none for the other ranks or unset)."""
    if not raw:
        return Fault()
    parts = raw.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        target, seconds, from_step = int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 1
        if target < 0 or not 0 <= seconds <= 3600 or from_step < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"environment {FAULT_ENV}={raw!r}: expected RANK:SECONDS[:FROM_STEP] (rank >= 0, 0-3600 seconds, "
            "from step >= 1), e.g. 1:0.5"
        ) from None
    return Fault(seconds, from_step) if target == rank else Fault()


class OwnTime:
    """This rank's own compute in one step: the host time of its micro-batches' forward passes and losses.

    Backward ends in the gradient all-reduce (ZeRO 0-2), where the ranks wait for the slowest one: the step's wall
    time says how slow the job is, this part says which rank makes it so. With ZeRO-3 the forward gathers weights,
    so its waits count too. On a GPU the host time is the time to queue the work (a host-side slowdown shows, a slow
    device shows only once the queue is full).
    """

    def __init__(self, fault: Fault = Fault()) -> None:
        self.fault = fault
        self.seconds = 0.0
        self._sleep = 0.0

    def begin(self, step: int) -> None:
        """A new optimizer step (1-based) starts."""
        self.seconds = 0.0
        self._sleep = self.fault.seconds if step >= self.fault.from_step else 0.0

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Time one micro-batch's forward pass and loss (the fault sleeps in the step's first one)."""
        started = time.perf_counter()
        if self._sleep:
            time.sleep(self._sleep)
            self._sleep = 0.0
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: its pod and node."""

    pod: str
    node: str


def local_peer(env: Mapping[str, str] | None = None) -> Peer:
    """This process's pod (FORGE_POD_NAME, else HOSTNAME) and node (FORGE_NODE_NAME, from the downward API)."""
    e = os.environ if env is None else env
    host = socket.gethostname()
    return Peer(e.get("FORGE_POD_NAME") or e.get("HOSTNAME") or host, e.get("FORGE_NODE_NAME") or "unknown")


@dataclass(frozen=True)
class Findings:
    """What holds after a read-back: the straggler and the throughput drop (None: none)."""

    straggler: Degraded | None = None
    drop: Degraded | None = None

    @property
    def key(self) -> tuple[int | None, bool]:
        """What a report of them says: the straggler's rank, whether throughput dropped."""
        return (self.straggler.rank if self.straggler is not None else None, self.drop is not None)


class PaceWatch:
    """Every rank's judge of the gathered step times (the same figures, so the same verdict on every rank) and rank
    0's judge of the job's throughput. A finding holds until ``read_backs`` read-backs in a row are without it."""

    def __init__(self, settings: PaceSettings, rank: int, world_size: int) -> None:
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.judge = PaceJudge(settings)
        self.findings = Findings()
        self.reported = False
        """Rank 0 reported the findings once (status.pace); later reports only when they change."""
        self._clear = {"straggler": 0, "drop": 0}

    def slots(self, own_seconds: float | None) -> list[float]:
        """This rank's figure at its place among zeros: summed over the ranks, every rank's figure."""
        out = [0.0] * self.world_size
        out[self.rank] = own_seconds or 0.0
        return out

    def observe(self, times: list[float], tokens_per_second: float | None, settled: bool) -> Findings:
        """One read-back: every rank's median own step seconds (0: none yet), and the job's tokens/s over the steps
        since the last read-back. ``settled`` False: the window began at a restart (the compile step, an
        evaluation, a checkpoint), whose first steps are not judged."""
        straggler, drop = self.findings.straggler, self.findings.drop
        if len(times) > 1 and all(t > 0 for t in times):
            straggler = self._hold("straggler", straggler, self.judge.straggler(times))
        if settled:
            drop = self._hold("drop", drop, self.judge.drop(tokens_per_second))
        self.findings = Findings(straggler, drop)
        return self.findings

    def _hold(self, kind: str, held: Degraded | None, found: Degraded | None) -> Degraded | None:
        if found is not None:
            self._clear[kind] = 0
            return found
        if held is None:
            return None
        self._clear[kind] += 1
        return None if self._clear[kind] >= self.settings.read_backs else held


def pace_status(findings: Findings, ranks: int, peers: list[Peer] | None, step: int, at: str) -> dict[str, object]:
    """status.pace: the straggler and the throughput drop that hold (null: none), with their figures."""
    out: dict[str, object] = {"ranks": ranks, "step": step, "time": at, "straggler": None, "throughputDrop": None}
    s = findings.straggler
    if s is not None and s.rank is not None:
        peer = peers[s.rank] if peers is not None and s.rank < len(peers) else None
        where = {} if peer is None else {"pod": peer.pod[:253], "node": peer.node[:253]}
        out["straggler"] = {
            "rank": s.rank,
            **where,
            "stepSeconds": round(s.value, 4),
            "medianSeconds": round(s.median, 4),
            "readBacks": s.read_backs,
        }
    d = findings.drop
    if d is not None:
        out["throughputDrop"] = {
            "tokensPerSecond": round(d.value, 1),
            "medianTokensPerSecond": round(d.median, 1),
            "readBacks": d.read_backs,
        }
    return out
