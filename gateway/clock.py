"""Clocks: the wall clock by default, and a clock that only moves when told to.

Everything that measures time (windows, feedback, the guardian, rollouts) takes a clock
argument, so a drill or a test of a 30-minute rule runs in milliseconds.
"""

from __future__ import annotations

import threading


class SimClock:
    """A clock the simulation advances; shared by windows, feedback, guardian and rollouts."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """The simulated time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self.now += seconds
