"""Admission control in front of the model run: a concurrency limit per version, and deadlines.

A request is admitted to a version only while that version has fewer than `limit` requests in
flight; past it the request is shed at once (RESOURCE_EXHAUSTED, with a hint of when a slot
frees up) instead of queueing without bound, so a slow or hung version holds at most `limit`
requests and cannot take the others' memory or workers.

Every request has a deadline: the caller's, or the endpoint's default (`deadline_ms` in the
route file, else the `default_deadline` setting), whichever comes first. Work whose deadline
has passed is not started (DEADLINE_EXCEEDED). Whatever runs the model (inline, the batcher,
or a runner thread) holds the `Slot` while the request is in flight and releases it when the
run is over; a known future delay (an injected latency) is held with `hold` without a timer.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from types import TracebackType

from gateway.errors import DeadlineExceeded, Overloaded

#: Retry hint when no slot has a known release time (the version's runs are in progress).
DEFAULT_RETRY_SECONDS = 0.05


class Slot:
    """One admitted request's place in its version's limit; released once (on exit, or `hold` later)."""

    __slots__ = ("_admission", "_held", "_key", "_released")

    def __init__(self, admission: Admission, key: tuple[str, str]) -> None:
        self._admission = admission
        self._key = key
        self._held = 0.0
        self._released = False

    def hold(self, seconds: float) -> None:
        """Keep the slot taken for `seconds` after release (the request still occupies its version)."""
        self._held = max(self._held, seconds)

    def release(self) -> None:
        """Give the slot back (idempotent); with `hold`, it frees up that much later."""
        if not self._released:
            self._released = True
            self._admission._release(self._key, self._held)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


class Admission:
    """Per-version in-flight counts and the deadline rule; safe from any thread."""

    def __init__(
        self, limit: int, default_deadline: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.default_deadline = default_deadline
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], list[float]] = {}  # release times of held slots, a heap
        self.shed = 0

    def deadline(self, remaining: float | None, endpoint_default: float | None = None) -> float | None:
        """The absolute deadline (this clock) of a request: the caller's, or the endpoint's or global default."""
        default = endpoint_default if endpoint_default is not None else self.default_deadline
        if remaining is None:
            remaining = default
        elif default is not None:
            remaining = min(remaining, default)
        return None if remaining is None else self._clock() + remaining

    def left(self, deadline: float | None) -> float | None:
        """Seconds until `deadline` (None: no deadline)."""
        return None if deadline is None else deadline - self._clock()

    def admit(self, endpoint: str, version: str, deadline: float | None = None) -> Slot:
        """A slot for one request, or DeadlineExceeded (not started) or Overloaded (shed)."""
        now = self._clock()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded(
                f"{endpoint} {version}: the request's deadline passed {1000 * (now - deadline):.0f} ms before "
                "its model run could start; it was not run"
            )
        key = (endpoint, version)
        with self._lock:
            held = self._held.get(key)
            while held and held[0] <= now:
                heapq.heappop(held)
            taken = self._active.get(key, 0) + (len(held) if held else 0)
            if taken >= self.limit:
                self.shed += 1
                retry = max(0.0, held[0] - now) if held else DEFAULT_RETRY_SECONDS
                raise Overloaded(
                    f"{endpoint} {version} has {taken} requests in flight, its limit "
                    f"(max_concurrent_per_version {self.limit}); retry in {1000 * retry:.0f} ms",
                    retry_after_seconds=retry,
                )
            self._active[key] = self._active.get(key, 0) + 1
        return Slot(self, key)

    def in_flight(self, endpoint: str, version: str) -> int:
        """Requests of a version admitted and not yet released (held slots included)."""
        key = (endpoint, version)
        now = self._clock()
        with self._lock:
            held = [t for t in self._held.get(key, ()) if t > now]
            return self._active.get(key, 0) + len(held)

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Requests in flight per (endpoint, version), held slots included (for the in-flight gauge)."""
        now = self._clock()
        with self._lock:
            keys = set(self._active) | set(self._held)
            return {key: self._active.get(key, 0) + sum(1 for t in self._held.get(key, ()) if t > now) for key in keys}

    def _release(self, key: tuple[str, str], held: float) -> None:
        with self._lock:
            self._active[key] -= 1
            if held > 0:
                heapq.heappush(self._held.setdefault(key, []), self._clock() + held)
