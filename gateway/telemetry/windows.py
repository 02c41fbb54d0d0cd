"""Sliding windows per series: per-second slots in a ring, an injectable clock, bounded memory.

Each slot holds one second of: requests, errors (server-side failures), client errors,
a latency histogram with logarithmic bins (a quantile estimate within `RELATIVE_ERROR` of
the true value, like DDSketch), rows seen and NaN counts per input feature, and, for shadow
comparisons, compared/agreeing counts. Memory is a fixed number of slots of fixed size,
whatever the traffic: a slot's latency bins are one array of `BINS` 32-bit counters
(about 1.6 KB), allocated the first time the slot sees a request, so a series costs at most
`horizon x 1.6 KB` (2.8 MB for the default 30 minutes) and an idle one almost nothing.
A window query sums the slots of the last N seconds.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Quantiles are estimated within this relative error (2%).
RELATIVE_ERROR = 0.02
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)
#: Latencies are tracked from 10 us to 60 s; values outside are clamped to the end bins.
MIN_LATENCY = 1e-5
MAX_LATENCY = 60.0
_OFFSET = math.ceil(math.log(MIN_LATENCY) / _LOG_GAMMA)
BINS = math.ceil(math.log(MAX_LATENCY) / _LOG_GAMMA) - _OFFSET + 1

#: Server-side failures that count as errors for the error-rate guardrail; other non-OK
#: codes (bad input, unknown names) are the caller's and are counted as client errors.
SERVER_ERROR_CODES = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS"})


_EMPTY_BINS = array("I", bytes(4 * BINS))


def latency_bin(seconds: float) -> int:
    """The histogram bin of a latency."""
    if seconds <= MIN_LATENCY:
        return 0
    index = math.ceil(math.log(seconds) / _LOG_GAMMA) - _OFFSET
    return index if index < BINS else BINS - 1


def bin_value(index: int) -> float:
    """The representative value of a bin (within RELATIVE_ERROR of every value in it)."""
    upper = _GAMMA ** (index + _OFFSET)
    return 2 * upper / (_GAMMA + 1)


class _Slot:
    __slots__ = (
        "agree",
        "client_errors",
        "compared",
        "errors",
        "latency",
        "nan",
        "outcome_sum",
        "outcomes",
        "requests",
        "rows",
        "second",
    )

    def __init__(self, features: int) -> None:
        self.second = -1
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.rows = 0
        self.compared = 0
        self.agree = 0
        self.outcomes = 0
        self.outcome_sum = 0.0
        self.latency: array[int] | None = None
        self.nan = [0] * features

    def reset(self, second: int) -> None:
        self.second = second
        self.requests = self.errors = self.client_errors = self.rows = self.compared = self.agree = 0
        self.outcomes = 0
        self.outcome_sum = 0.0
        if self.latency is not None:
            self.latency = _EMPTY_BINS[:]
        for i in range(len(self.nan)):
            self.nan[i] = 0


@dataclass(frozen=True)
class WindowStats:
    """Totals over a window, with latency quantiles and per-feature NaN rates."""

    seconds: int
    requests: int
    errors: int
    client_errors: int
    rows: int
    nan_counts: tuple[int, ...]
    compared: int
    agree: int
    latency_bins: np.ndarray = field(repr=False)
    outcomes: int = 0
    outcome_sum: float = 0.0

    @property
    def error_rate(self) -> float:
        """Server-side errors / requests (0 when there were none)."""
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        """Latency quantile in seconds (NaN when no latency was recorded)."""
        cumulative = np.cumsum(self.latency_bins)
        total = int(cumulative[-1]) if len(cumulative) else 0
        if not total:
            return math.nan
        index = int(np.searchsorted(cumulative, q * (total - 1), side="right"))
        return bin_value(min(index, BINS - 1))

    def nan_rate(self, feature: int) -> float:
        """Share of rows whose feature was NaN (0 when no rows)."""
        return self.nan_counts[feature] / self.rows if self.rows else 0.0

    @property
    def outcome_rate(self) -> float:
        """Mean outcome (CTR for clicks; NaN without outcomes)."""
        return self.outcome_sum / self.outcomes if self.outcomes else math.nan

    @property
    def agreement_rate(self) -> float:
        """Shadow decisions agreeing with the primary (NaN when nothing was compared)."""
        return self.agree / self.compared if self.compared else math.nan


class SlidingWindow:
    """A ring of one-second slots for one series. Thread-safe; O(1) per record."""

    def __init__(self, horizon_seconds: int, *, features: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.horizon = horizon_seconds
        self.features = features
        self._clock = clock
        self._slots = [_Slot(features) for _ in range(horizon_seconds)]
        self._lock = threading.Lock()

    def _slot(self, now: float) -> _Slot:
        second = int(now)
        slot = self._slots[second % self.horizon]
        if slot.second != second:
            slot.reset(second)
        return slot

    def record(self, seconds: float, code: str, rows: int = 0, nan_per_feature: Sequence[int] | None = None) -> None:
        """One request: its latency, status code name, batch rows and NaN count per feature."""
        with self._lock:
            slot = self._slot(self._clock())
            slot.requests += 1
            if code != "OK":
                if code in SERVER_ERROR_CODES:
                    slot.errors += 1
                else:
                    slot.client_errors += 1
            if slot.latency is None:
                slot.latency = _EMPTY_BINS[:]
            slot.latency[latency_bin(seconds)] += 1
            slot.rows += rows
            if nan_per_feature is not None:
                counts = slot.nan
                for i, count in enumerate(nan_per_feature[: len(counts)]):
                    counts[i] += count

    def record_comparison(self, agree: int, decisions: int = 1) -> None:
        """One shadow comparison: of its `decisions` (rows), how many agreed with the primary's."""
        with self._lock:
            slot = self._slot(self._clock())
            slot.compared += decisions
            slot.agree += agree

    def record_outcome(self, value: float) -> None:
        """One business outcome (a click is 1, no click 0) joined to a request this series served."""
        with self._lock:
            slot = self._slot(self._clock())
            slot.outcomes += 1
            slot.outcome_sum += value

    def stats(self, seconds: int) -> WindowStats:
        """Totals over the last `seconds` (at most the horizon), this second included."""
        span = min(seconds, self.horizon)
        with self._lock:
            now = int(self._clock())
            live = [s for s in self._slots if now - span < s.second <= now]
            latency = np.zeros(BINS, dtype=np.int64)
            for slot in live:
                if slot.latency is not None:
                    latency += np.frombuffer(slot.latency, dtype=np.uint32)
            nan = [sum(s.nan[i] for s in live) for i in range(self.features)]
            return WindowStats(
                seconds=span,
                requests=sum(s.requests for s in live),
                errors=sum(s.errors for s in live),
                client_errors=sum(s.client_errors for s in live),
                rows=sum(s.rows for s in live),
                nan_counts=tuple(nan),
                compared=sum(s.compared for s in live),
                agree=sum(s.agree for s in live),
                latency_bins=latency,
                outcomes=sum(s.outcomes for s in live),
                outcome_sum=sum(s.outcome_sum for s in live),
            )


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """What a window is kept for: an endpoint's version, weighted traffic or pinned."""

    endpoint: str
    version: str
    pinned: bool = False


class WindowStore:
    """The windows of every series, created on first use. Reads never block the hot path long."""

    def __init__(self, horizon_seconds: int = 1800, *, clock: Callable[[], float] = time.time) -> None:
        self.horizon = horizon_seconds
        self._clock = clock
        self._windows: dict[SeriesKey, SlidingWindow] = {}
        self._lock = threading.Lock()

    def window(self, key: SeriesKey, features: int = 0) -> SlidingWindow:
        """The window of a series (created with `features` NaN counters on first use)."""
        window = self._windows.get(key)
        if window is None:
            with self._lock:
                window = self._windows.get(key)
                if window is None:
                    window = SlidingWindow(self.horizon, features=features, clock=self._clock)
                    self._windows[key] = window
        return window

    def keys(self) -> Iterable[SeriesKey]:
        """Every series with a window."""
        return list(self._windows)
