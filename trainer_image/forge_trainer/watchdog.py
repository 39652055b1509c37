"""Hang watchdog: each rank times its own training steps and ends itself when one hangs.

A step (its forward, backward, optimizer step and the collectives in between) that takes more than
``multiple`` x the median of the recent steps, and more than ``floor_seconds``, is a hang: a collective waiting for
a rank that is stopped, a wedged device, a deadlock. The watchdog thread then writes every thread's stack to the
log (faulthandler), says which rank, step and phase hung and for how long, and ends the process with the retryable
exit code 202, so that the job restarts from its latest complete checkpoint in minutes instead of waiting for the
distributed timeout (NCCL's default is 30 minutes); the caller's ``on_hang`` dumps and exits. Only steps are
timed: start-up, evaluation and checkpoint saves are not (they have no recent median to judge by).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchdogSettings:
    """When a step counts as hung."""

    multiple: float = 10.0
    floor_seconds: float = 300.0
    window: int = 20


def hang_limit(recent: list[float], settings: WatchdogSettings) -> float:
    """Seconds a step may take: ``multiple`` x the median of the recent steps, never below the floor."""
    if not recent:
        return settings.floor_seconds
    return max(settings.floor_seconds, settings.multiple * statistics.median(recent))


class HangWatchdog:
    """Times the steps of one rank in a background thread; see the module docstring."""

    def __init__(
        self,
        settings: WatchdogSettings,
        rank: int,
        on_hang: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.rank = rank
        self._clock = clock
        self._recent: deque[float] = deque(maxlen=settings.window)
        self._started: float | None = None
        self._step = 0
        self._phase = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on_hang = on_hang
        self._thread = threading.Thread(target=self._watch, name="forge-watchdog", daemon=True)
        self._thread.start()

    def step_started(self, step: int, phase: str = "train step") -> None:
        """A step begins: the clock runs until step_ended()."""
        with self._lock:
            self._started, self._step, self._phase = self._clock(), step, phase

    def step_ended(self) -> None:
        """The step is done: its time joins the recent steps."""
        with self._lock:
            if self._started is not None:
                self._recent.append(self._clock() - self._started)
            self._started = None

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()

    def check(self) -> str | None:
        """The hang message when the running step is over its limit, else None (called by the thread)."""
        with self._lock:
            if self._started is None:
                return None
            elapsed = self._clock() - self._started
            limit = hang_limit(list(self._recent), self.settings)
            if elapsed <= limit:
                return None
            median = statistics.median(self._recent) if self._recent else None
            basis = (
                f"{self.settings.multiple:g} x the median {median:.2f}s of the last steps" if median else "no median"
            )
            return (
                f"hang watchdog: rank {self.rank}, step {self._step} ({self._phase}) has run {elapsed:.0f}s, over its "
                f"limit {limit:.0f}s (the larger of {basis} and the floor {self.settings.floor_seconds:g}s): "
                "a collective is waiting for a rank that does not answer, or the device is wedged. Every thread's "
                "stack follows; this rank exits with the retryable code 202 and the job restarts from its latest "
                "complete checkpoint."
            )

    def _watch(self) -> None:
        period = min(5.0, max(0.2, self.settings.floor_seconds / 10))
        while not self._stop.wait(period):
            message = self.check()
            if message is not None:
                self._on_hang(message)
                return
