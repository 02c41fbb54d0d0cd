"""Sliding windows per series: per-second slots in a ring, an injectable clock, bounded memory.

A series counts requests, errors (server-side failures), client errors, timeouts (the caller's
deadline passed or it cancelled), a latency histogram with logarithmic bins (a quantile
estimate within `RELATIVE_ERROR` of the true value, like DDSketch), rows and NaN counts per
input feature, shadow comparisons (compared / agreeing), business outcomes and business
values (count, sum and sum of squares, for the value-per-request test). Memory is a fixed
number of slots of fixed size, whatever the traffic: each slot that saw traffic holds one
snapshot of the running totals (about 1.8 KB, mostly the `BINS` 32-bit latency counters), so
a series costs at most `horizon x 1.8 KB` (3.2 MB for the default 30 minutes) and an idle one
almost nothing. Input and score histograms for the drift rules live beside, in `drift.py`.

Every field of the totals is additive (a count, a sum, a histogram's bins, a count per
feature), so a series' seconds can be exported (`export`) and added into another series
(`merge`): the guardian leader adds up every process's seconds into the fleet's windows. A
field added to `_Totals` merges with no other change, as long as it is additive too (a
maximum or a sample is not).
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.guardrails.sequential import Moments

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
#: Requests whose caller did not get the answer: its deadline passed, or it cancelled.
TIMEOUT_CODES = frozenset({"DEADLINE_EXCEEDED", "CANCELLED"})


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


_COUNTERS = ("requests", "errors", "client_errors", "rows", "compared", "agree", "outcomes", "outcome_sum",
             "timeouts", "values", "value_sum", "value_squares")  # fmt: skip

#: One second of one series as exported: every field of its totals by name, a number or (for
#: histograms and per-feature counts) a numpy vector. Only what changed is kept (zeros are left out).
Counts = dict[str, "int | float | np.ndarray"]


class _Totals:
    """Running totals of a series since it started (a snapshot of them marks each second)."""

    __slots__ = ("agree", "client_errors", "compared", "errors", "latency", "nan", "outcome_sum", "outcomes",
                 "requests", "rows", "timeouts", "value_squares", "value_sum", "values")  # fmt: skip

    def __init__(self, features: int) -> None:
        self.requests = self.errors = self.client_errors = self.rows = self.compared = self.agree = 0
        self.outcomes = self.timeouts = self.values = 0
        self.outcome_sum = self.value_sum = self.value_squares = 0.0
        self.latency = _EMPTY_BINS[:]
        self.nan = [0] * features

    def copy(self) -> _Totals:
        other = _Totals.__new__(_Totals)
        for name in _COUNTERS:
            setattr(other, name, getattr(self, name))
        other.latency = self.latency[:]
        other.nan = self.nan[:]
        return other

    def minus(self, start: _Totals) -> Counts:
        """What was added since `start` (an earlier snapshot of the same series), field by field."""
        counts: Counts = {}
        for name in _Totals.__slots__:
            end, before = getattr(self, name), getattr(start, name)
            if isinstance(end, int | float):
                if end != before:
                    counts[name] = end - before
                continue
            vector = np.array(end)
            if len(before):
                vector = vector.astype(np.int64 if vector.dtype.kind in "iu" else np.float64)
                vector[: len(before)] -= np.array(before)[: len(vector)]
            if vector.any():
                counts[name] = vector
        return counts

    def add(self, counts: Counts) -> None:
        """Add exported counts (of this series or another process's) field by field."""
        for name, value in counts.items():
            current = getattr(self, name, None)
            if current is None:  # a field this version does not know (a newer process): not ours to judge
                continue
            if isinstance(current, int | float):
                number = value if isinstance(value, int | float) else float(value)
                setattr(self, name, current + (round(number) if isinstance(current, int) else number))
                continue
            vector = np.asarray(value)
            if isinstance(current, array):
                view = np.frombuffer(current, dtype=np.uint32)
                size = min(len(view), len(vector))
                np.add(view[:size], vector[:size], out=view[:size], casting="unsafe")
                continue
            if len(vector) > len(current):
                current.extend([0] * (len(vector) - len(current)))
            for i in np.flatnonzero(vector):
                current[i] += vector[i].item()


class _Slot:
    """One second of the ring: which second it is and the running totals when it began."""

    __slots__ = ("second", "start")

    def __init__(self) -> None:
        self.second = -1
        self.start: _Totals | None = None


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
    timeouts: int = 0
    values: int = 0
    value_sum: float = 0.0
    value_squares: float = 0.0

    @property
    def error_rate(self) -> float:
        """Server-side errors / requests (0 when there were none)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def timeout_rate(self) -> float:
        """Requests whose caller's deadline passed or that it cancelled / requests (0 when there were none)."""
        return self.timeouts / self.requests if self.requests else 0.0

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
    def agreement_rate(self) -> float:
        """Shadow decisions agreeing with the primary (NaN when nothing was compared)."""
        return self.agree / self.compared if self.compared else math.nan


class SlidingWindow:
    """A ring of one-second slots for one series. Thread-safe; O(1) per record and per query.

    The series keeps running totals; the first event of each second snapshots them into that
    second's slot. A window's totals are the running totals now minus the snapshot at the
    window's first second, so a 30-minute query costs the same as a 1-second one.
    """

    def __init__(self, horizon_seconds: int, *, features: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.horizon = horizon_seconds
        self._clock = clock
        self._slots = [_Slot() for _ in range(horizon_seconds)]
        self._totals = _Totals(features)
        self._lock = threading.Lock()
        # The first and the latest second that saw an event: a window reaching back before the
        # first (a new canary's, for a whole window) or starting after the latest (an idle
        # series) is answered without walking its empty seconds.
        self._first_second = self._last_second = -1

    def _tick(self, now: float) -> _Totals:
        second = int(now)
        slot = self._slots[second % self.horizon]
        if slot.second != second:
            slot.second = second
            slot.start = self._totals.copy()
            if self._first_second < 0:
                self._first_second = second
            self._last_second = second
        return self._totals

    def record(self, seconds: float, code: str, rows: int = 0, nan_per_feature: Sequence[int] | None = None) -> None:
        """One request: its latency, status code name, batch rows and NaN count per feature."""
        with self._lock:
            totals = self._tick(self._clock())
            totals.requests += 1
            if code != "OK":
                if code in SERVER_ERROR_CODES:
                    totals.errors += 1
                else:
                    totals.client_errors += 1
                if code in TIMEOUT_CODES:
                    totals.timeouts += 1
            totals.latency[latency_bin(seconds)] += 1
            totals.rows += rows
            if nan_per_feature is not None:
                self._grow(len(nan_per_feature))
                counts = totals.nan
                for i, count in enumerate(nan_per_feature):
                    counts[i] += count

    def _grow(self, features: int) -> None:
        # A window made before the first request (by the guardian, a shadow comparison, feedback)
        # starts without NaN counters; snapshots taken before they existed read as 0 for them.
        counts = self._totals.nan
        if features > len(counts):
            counts.extend([0] * (features - len(counts)))

    def track_features(self, features: int) -> None:
        """Count NaNs for (at least) `features` input features from now on."""
        if features > len(self._totals.nan):
            with self._lock:
                self._grow(features)

    def record_comparison(self, agree: int, decisions: int = 1) -> None:
        """One shadow comparison: of its `decisions` (rows), how many agreed with the primary's."""
        with self._lock:
            totals = self._tick(self._clock())
            totals.compared += decisions
            totals.agree += agree

    def record_abandoned(self) -> None:
        """A request already recorded whose caller had gone (deadline or cancellation) before the answer left."""
        with self._lock:
            self._tick(self._clock()).timeouts += 1

    def record_outcome(self, outcome: float, value: float | None = None) -> None:
        """One business outcome (a click is 1, no click 0) joined to a request this series served.

        `value` is its business value (revenue, watch time) when the caller sent one.
        """
        with self._lock:
            totals = self._tick(self._clock())
            totals.outcomes += 1
            totals.outcome_sum += outcome
            if value is not None:
                totals.values += 1
                totals.value_sum += value
                totals.value_squares += value * value

    def running(self, *names: str) -> tuple[float, ...]:
        """Running totals of the named counters since the series began (for cumulative metrics)."""
        with self._lock:
            return tuple(getattr(self._totals, name) for name in names)

    def outcome_totals(self) -> tuple[int, float]:
        """(outcomes, their sum) since the series began: the running totals, not a window."""
        with self._lock:
            return self._totals.outcomes, self._totals.outcome_sum

    def value_totals(self) -> Moments:
        """Count, sum and sum of squares of the business values since the series began (not a window)."""
        with self._lock:
            totals = self._totals
            return Moments(totals.values, totals.value_sum, totals.value_squares)

    def export(self, first: int) -> tuple[int, list[tuple[int, Counts]]]:
        """(now, what each second from `first` to now added), seconds without a change left out.

        The current second is still counting: a later export from it replaces what this one said.
        """
        with self._lock:
            now = int(self._clock())
            held = []
            for second in range(max(first, now - self.horizon + 1), now + 1):
                slot = self._slots[second % self.horizon]
                if slot.second == second and slot.start is not None:
                    held.append((second, slot.start))
            if not held:
                return now, []
            ends = [start for _, start in held[1:]] + [self._totals]
            seconds = [(second, end.minus(start)) for (second, start), end in zip(held, ends, strict=True)]
        return now, [(second, counts) for second, counts in seconds if counts]

    def merge(self, seconds: Sequence[tuple[int, Counts]]) -> None:
        """Add counts that these seconds (ascending) saw elsewhere: the fleet's windows are built so.

        A second later than now counts as now; one older than the horizon is dropped. One pass
        over the seconds from the first merged to the newest held, whatever their number: every
        snapshot after a merged second gets the counts merged before it.
        """
        with self._lock:
            now = int(self._clock())
            items = [(min(second, now), counts) for second, counts in seconds if second > now - self.horizon]
            if not items:
                return
            first, end = items[0][0], max(self._last_second, items[-1][0])
            held = [t for t in range(first, end + 1) if self._held(t)]
            added: Counts = {}  # what this merge added before the second being visited
            index = next_held = 0
            for second in range(first, end + 1):
                slot = self._slots[second % self.horizon]
                if next_held < len(held) and held[next_held] == second:
                    next_held += 1
                    if added:
                        assert slot.start is not None
                        slot.start.add(added)
                if index < len(items) and items[index][0] == second and slot.second != second:
                    # The totals at the start of `second`: those of the next second held, plus what came before.
                    later = self._slots[held[next_held] % self.horizon].start if next_held < len(held) else None
                    slot.second = second
                    slot.start = (later if later is not None else self._totals).copy()
                    slot.start.add(added)
                while index < len(items) and items[index][0] == second:
                    _accumulate(added, items[index][1])
                    index += 1
            self._totals.add(added)
            self._last_second = max(self._last_second, end)
            if self._first_second < 0 or first < self._first_second:
                self._first_second = first

    def _held(self, second: int) -> bool:
        slot = self._slots[second % self.horizon]
        return slot.second == second and slot.start is not None

    def _start_of(self, first: int, now: int) -> _Totals | None:
        """The running totals at the beginning of second `first` (None: nothing happened since)."""
        if self._last_second < first:
            return None
        for second in range(max(first, self._first_second), now + 1):
            slot = self._slots[second % self.horizon]
            if slot.second == second:
                return slot.start
        return None

    def stats(self, seconds: int) -> WindowStats:
        """Totals over the last `seconds` (at most the horizon), this second included."""
        span = min(seconds, self.horizon)
        with self._lock:
            now = int(self._clock())
            start = self._start_of(now - span + 1, now)
            end = self._totals
            if start is None:
                start = end
            counters = {name: getattr(end, name) - getattr(start, name) for name in _COUNTERS}
            latency = np.frombuffer(end.latency, dtype=np.uint32).astype(np.int64) - np.frombuffer(
                start.latency, dtype=np.uint32
            )
            before = start.nan
            nan = tuple(e - (before[i] if i < len(before) else 0) for i, e in enumerate(end.nan))
        return WindowStats(seconds=span, nan_counts=nan, latency_bins=latency, **counters)


def _accumulate(into: Counts, counts: Counts) -> None:
    """Add `counts` into `into`, field by field (vectors padded to the longer one)."""
    for name, value in counts.items():
        held = into.get(name)
        if held is None:
            into[name] = value.copy() if isinstance(value, np.ndarray) else value
        elif isinstance(held, np.ndarray) or isinstance(value, np.ndarray):
            a, b = np.asarray(held), np.asarray(value)
            total = np.zeros(max(len(a), len(b)), dtype=np.result_type(a, b, np.int64))
            total[: len(a)] += a
            total[: len(b)] += b
            into[name] = total
        else:
            into[name] = held + value


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
        self.clock = clock
        self._windows: dict[SeriesKey, SlidingWindow] = {}
        self._lock = threading.Lock()

    def window(self, key: SeriesKey, features: int = 0) -> SlidingWindow:
        """The window of a series, created on first use (a record with more features adds NaN counters)."""
        window = self._windows.get(key)
        if window is None:
            with self._lock:
                window = self._windows.get(key)
                if window is None:
                    window = SlidingWindow(self.horizon, features=features, clock=self.clock)
                    self._windows[key] = window
        window.track_features(features)
        return window

    def keys(self) -> Iterable[SeriesKey]:
        """Every series with a window."""
        return list(self._windows)

    def export(self, first: int) -> tuple[int, dict[SeriesKey, list[tuple[int, Counts]]]]:
        """(now, each series' changed seconds from `first` on): what the guardian leader pulls."""
        now = int(self.clock())
        series = {}
        for key, window in list(self._windows.items()):
            now, seconds = window.export(first)
            if seconds:
                series[key] = seconds
        return now, series
