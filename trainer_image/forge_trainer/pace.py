"""The pace of training: each rank's recent step times and data waits, stragglers among the ranks, and throughput
drops of the job.

Timing is host-side (``time.perf_counter`` around the step, as the hang watchdog does): no device sync is added.
The figures are read at read-backs only (every training.logEverySteps steps); rank 0 gathers one float per rank
there (``Run._pace``) and judges with the pure functions below.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

WINDOW = 20


class StepClock:
    """One rank's last ``window`` steps: the wait for the batch, and the step itself (forward, backward, optimizer)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._wait: deque[float] = deque(maxlen=window)
        self._compute: deque[float] = deque(maxlen=window)

    def add(self, wait_s: float, compute_s: float) -> None:
        self._wait.append(max(0.0, wait_s))
        self._compute.append(max(0.0, compute_s))

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


def slowest_over(times: list[float], percent: int) -> int | None:
    """The rank whose step time is above ``percent``% of the median of the other ranks (the slowest such rank);
    None when every rank is within it, or with fewer than two ranks."""
    if len(times) < 2:
        return None
    worst: tuple[float, int] | None = None
    for rank, own in enumerate(times):
        others = statistics.median(times[:rank] + times[rank + 1 :])
        if others > 0 and own * 100 > others * percent:
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
        rank = slowest_over(times, self.settings.straggler_percent)
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
        )

    def drop(self, tokens_per_second: float | None) -> Degraded | None:
        """Feed one read-back's job throughput (tokens/s)."""
        if tokens_per_second is None or tokens_per_second <= 0:
            return None
        history = list(self._throughput)
        self._throughput.append(tokens_per_second)
        if len(history) < self.settings.read_backs:
            return None
        median = statistics.median(history)
        low = tokens_per_second * 100 < median * self.settings.drop_percent
        self._low_count = self._low_count + 1 if low else 0
        if self._low_count < self.settings.read_backs:
            return None
        return Degraded(
            "ThroughputDrop",
            f"{tokens_per_second:.4g} tokens/s is below {self.settings.drop_percent}% of the job's running median "
            f"{median:.4g} tokens/s for {self._low_count} read-backs in a row",
        )
