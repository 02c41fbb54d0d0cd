"""The process's resident memory, sampled once a second into a ring, for the memory_growth guardrail.

Memory is a property of the process, not of a version: every model version of every endpoint
shares one heap. The ring only says how much the process grew and when; the guardian
attributes growth to a version by timing (see `gateway/orchestration/memory.py`).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux: /proc/self/statm; elsewhere the peak, which only grows)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class Growth:
    """How much resident memory grew over a stretch of samples: from the lowest to the latest."""

    grown_bytes: int
    samples: int
    lowest_bytes: int
    lowest_at: float
    latest_bytes: int


class MemoryWindow:
    """One resident-memory sample per second over `horizon_seconds`; fixed memory. Thread-safe."""

    def __init__(
        self,
        horizon_seconds: int = 1800,
        *,
        clock: Callable[[], float] = time.time,
        reader: Callable[[], int] = rss_bytes,
    ) -> None:
        self.horizon = horizon_seconds
        self._clock = clock
        self._reader = reader
        self._seconds = [-1] * horizon_seconds
        self._bytes = [0] * horizon_seconds
        self._lock = threading.Lock()

    def sample(self) -> int:
        """Read the resident memory now and keep it for this second; returns it."""
        value = self._reader()
        self.put(int(self._clock()), value)
        return value

    def export(self, first: int) -> list[tuple[int, int]]:
        """(second, bytes) of the samples from `first` on, oldest first (what the guardian leader pulls)."""
        now = int(self._clock())
        with self._lock:
            return [
                (second, self._bytes[second % self.horizon])
                for second in range(max(first, now - self.horizon + 1), now + 1)
                if self._seconds[second % self.horizon] == second
            ]

    def put(self, second: int, value: int) -> None:
        """Keep a sample another process took (the guardian leader's copy of its memory)."""
        with self._lock:
            self._seconds[second % self.horizon] = second
            self._bytes[second % self.horizon] = value

    def latest(self) -> int:
        """The most recent sample (0 before the first)."""
        with self._lock:
            newest = max(range(self.horizon), key=self._seconds.__getitem__)
            return self._bytes[newest] if self._seconds[newest] >= 0 else 0

    def growth(self, seconds: int, since: float = 0.0) -> Growth:
        """Growth over the samples of the last `seconds` taken at or after `since`: latest minus lowest."""
        now = int(self._clock())
        first = max(now - min(seconds, self.horizon) + 1, int(since) + (since > int(since)))
        samples = self.export(first)
        if not samples:
            return Growth(0, 0, 0, 0.0, 0)
        lowest_at, lowest = min(samples, key=lambda s: s[1])
        latest = samples[-1][1]
        return Growth(latest - lowest, len(samples), lowest, float(lowest_at), latest)
