"""Shadow accounting and comparison records, kept in memory with bounded size.

A report is computed from a `ShadowSummary`: the window's counts, with the per-request
differences and latencies on fixed logarithmic bins (quantiles within 2%) and the most
divergent requests. Summaries of several processes add up, so the fleet's report is the same
whichever process is asked, and no process ships another its samples.

Latency is compared like with like: for both the primary and the shadow, the model run of one
request's rows on their own (plus any injected delay), paired on the same requests. The shadow
worker runs queued copies as one batch for the comparison, and times one copy of each batch on
its own (every copy, when copies arrive one at a time); only requests timed on both sides
enter the latency quantiles.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from gateway.telemetry.windows import RELATIVE_ERROR, bin_value, latency_bin

HORIZON_SECONDS = 24 * 3600
_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class ComparisonRecord:
    """One compared request (the largest difference over its outputs)."""

    at: float
    request_id: str
    primary_version: str
    max_abs: float
    mean_abs: float
    max_rel: float
    rows: int
    agree: int
    primary_seconds: float  # the primary's model run of this request
    shadow_seconds: float  # the shadow's run of this request alone; NaN when it was only run in a batch


@dataclass
class Counts:
    """What happened to a shadow's copies in one minute (or in total)."""

    mirrored: int = 0
    dropped: int = 0
    compared: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        """Add `other` into these counts."""
        self.mirrored += other.mirrored
        self.dropped += other.dropped
        self.compared += other.compared
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n

    def minus(self, other: Counts) -> Counts:
        """These counts less `other`."""
        errors = {code: n - other.errors.get(code, 0) for code, n in self.errors.items()}
        return Counts(
            self.mirrored - other.mirrored,
            self.dropped - other.dropped,
            self.compared - other.compared,
            {code: n for code, n in errors.items() if n},
        )

    @property
    def total(self) -> int:
        """Every count, added up (0: nothing happened)."""
        return self.mirrored + self.dropped + self.compared + sum(self.errors.values())


class _Series:
    """Per-minute counters over the horizon, cumulative counters, and the newest records."""

    def __init__(self, records: int) -> None:
        self.total = Counts()
        self.minutes: dict[int, Counts] = {}
        self.records: deque[ComparisonRecord] = deque(maxlen=records)

    def bucket(self, now: float) -> Counts:
        minute = int(now // 60)
        counts = self.minutes.get(minute)
        if counts is None:
            counts = self.minutes[minute] = Counts()
            for old in [m for m in self.minutes if m <= minute - HORIZON_SECONDS // 60]:
                del self.minutes[old]
        return counts


@dataclass(frozen=True)
class ShadowReport:
    """How a shadow version compares with the primaries it mirrored, over a window."""

    endpoint: str
    shadow_version: str
    window_seconds: int
    mirrored: int
    compared: int
    dropped: int
    errors: dict[str, int]
    decisions: int
    agree: int
    agreement_rate: float
    agreement_ci: tuple[float, float]
    diff_quantiles: dict[str, float]
    primary_latency_ms: dict[str, float]
    shadow_latency_ms: dict[str, float]
    top_divergent: list[tuple[str, float]]
    primary_versions: list[str]
    diff_histogram: list[tuple[float, int]] = field(default_factory=list)
    #: How many processes' comparisons it adds up (the fleet's live processes that answered).
    processes: int = 1
    latency_samples: int = 0
    #: Where the numbers come from when that is not obvious (history read back after a restart).
    note: str = ""

    @property
    def shadow_errors(self) -> int:
        """Failed shadow runs."""
        return sum(self.errors.values())


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (NaN, NaN without trials)."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


#: Upper edges of the diff histogram: 0 (identical), then one bucket per decade.
DIFF_EDGES = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, math.inf)


def diff_histogram(values: list[float]) -> list[tuple[float, int]]:
    """Counts of values per bucket of DIFF_EDGES (a value goes to the first edge >= it)."""
    counts = [0] * len(DIFF_EDGES)
    for value in values:
        for i, edge in enumerate(DIFF_EDGES):
            if value <= edge:
                counts[i] += 1
                break
    return list(zip(DIFF_EDGES, counts, strict=True))


_DIFF_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_DIFF_LOG_GAMMA = math.log(_DIFF_GAMMA)
#: Differences are binned from 1e-12 to 1e12 (clamped); bin 0 holds exact zeros and the last infinity.
_DIFF_OFFSET = math.ceil(math.log(1e-12) / _DIFF_LOG_GAMMA)
_DIFF_FINITE = math.ceil(math.log(1e12) / _DIFF_LOG_GAMMA) - _DIFF_OFFSET + 1
DIFF_BINS = _DIFF_FINITE + 2


def diff_bin(value: float) -> int:
    """The bin of a per-request difference (NaN counts as infinity, the largest difference)."""
    if value <= 0:
        return 0
    if math.isinf(value) or math.isnan(value):
        return DIFF_BINS - 1
    index = math.ceil(math.log(value) / _DIFF_LOG_GAMMA) - _DIFF_OFFSET
    return 1 + min(max(index, 0), _DIFF_FINITE - 1)


def diff_bin_value(index: int) -> float:
    """A bin's representative value (within RELATIVE_ERROR of every value in it)."""
    if index <= 0:
        return 0.0
    if index >= DIFF_BINS - 1:
        return math.inf
    return 2 * _DIFF_GAMMA ** (index - 1 + _DIFF_OFFSET) / (_DIFF_GAMMA + 1)


def bin_quantiles(bins: Mapping[int, int], value: Callable[[int], float], scale: float = 1.0) -> dict[str, float]:
    """p50, p95 and p99 of binned values, interpolated between ranks like numpy's default (NaN when empty).

    An interpolation towards infinity is infinity (a difference can be infinite).
    """
    items = sorted((index, count) for index, count in bins.items() if count > 0)
    total = sum(count for _, count in items)
    if not total:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan}
    cumulative = np.cumsum([count for _, count in items])

    def at(rank: int) -> float:
        return value(items[int(np.searchsorted(cumulative, rank, side="right"))][0]) * scale

    out = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        rank = q * (total - 1)
        low, high = at(math.floor(rank)), at(math.ceil(rank))
        share = rank - math.floor(rank)
        out[name] = low if share == 0 or low == high else (math.inf if math.isinf(high) else low + share * (high - low))
    return out


@dataclass
class ShadowSummary:
    """One shadow's comparisons over a window, as counts that add up across processes; reports come from it."""

    endpoint: str
    shadow_version: str
    window_seconds: int
    #: Whether the process (any of them, once merged) ever mirrored to this shadow.
    seen: bool = False
    mirrored: int = 0
    compared: int = 0
    dropped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    decisions: int = 0
    agree: int = 0
    diff_bins: dict[int, int] = field(default_factory=dict)
    diff_max: float = math.nan
    diff_decades: list[int] = field(default_factory=lambda: [0] * len(DIFF_EDGES))
    primary_latency: dict[int, int] = field(default_factory=dict)
    shadow_latency: dict[int, int] = field(default_factory=dict)
    #: The most divergent requests, (request id, largest difference), largest first (ties by id).
    top: list[tuple[str, float]] = field(default_factory=list)
    primary_versions: set[str] = field(default_factory=set)
    processes: int = 1
    #: Requests timed on both sides (the latency bins' count).
    latency_samples: int = 0

    def merge(self, other: ShadowSummary, top: int) -> None:
        """Add another process's summary of the same shadow and window (in place)."""
        self.processes += other.processes
        self.seen = self.seen or other.seen
        self.mirrored += other.mirrored
        self.compared += other.compared
        self.dropped += other.dropped
        _add(self.errors, other.errors)
        self.decisions += other.decisions
        self.agree += other.agree
        _add(self.diff_bins, other.diff_bins)
        if not math.isnan(other.diff_max):
            self.diff_max = other.diff_max if math.isnan(self.diff_max) else max(self.diff_max, other.diff_max)
        self.diff_decades = [a + b for a, b in zip(self.diff_decades, other.diff_decades, strict=True)]
        _add(self.primary_latency, other.primary_latency)
        _add(self.shadow_latency, other.shadow_latency)
        self.top = _most_divergent([*self.top, *other.top], top)
        self.primary_versions |= other.primary_versions
        self.latency_samples += other.latency_samples

    def report(self) -> ShadowReport:
        """The numbers a person reads to decide whether the shadow can become a canary."""
        diff = bin_quantiles(self.diff_bins, diff_bin_value)
        diff["max"] = self.diff_max
        return ShadowReport(
            endpoint=self.endpoint,
            shadow_version=self.shadow_version,
            window_seconds=self.window_seconds,
            mirrored=self.mirrored,
            compared=self.compared,
            dropped=self.dropped,
            errors=dict(sorted(self.errors.items())),
            decisions=self.decisions,
            agree=self.agree,
            agreement_rate=self.agree / self.decisions if self.decisions else math.nan,
            agreement_ci=wilson_interval(self.agree, self.decisions),
            diff_quantiles=diff,
            primary_latency_ms=bin_quantiles(self.primary_latency, bin_value, 1000),
            shadow_latency_ms=bin_quantiles(self.shadow_latency, bin_value, 1000),
            top_divergent=list(self.top),
            primary_versions=sorted(self.primary_versions),
            diff_histogram=list(zip(DIFF_EDGES, self.diff_decades, strict=True)),
            processes=self.processes,
            latency_samples=self.latency_samples,
        )


def _add(into: dict[_K, int], more: Mapping[_K, int]) -> None:
    for key, count in more.items():
        into[key] = into.get(key, 0) + count


def _most_divergent(requests: Iterable[tuple[str, float]], top: int) -> list[tuple[str, float]]:
    """The `top` largest differences; equal ones by request id, so every merge order gives one answer."""
    return sorted(requests, key=lambda item: (-item[1], item[0]))[:top]


#: How primary and shadow latency are measured (the same way for both; see the module docstring).
LATENCY_MEASURE = "model run per request, alone, at the request's own batch size, paired on the same requests"


class ShadowStats:
    """Counts every mirrored copy exactly once and keeps the newest comparison records."""

    def __init__(self, *, records: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records = records
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()
        self._exported: dict[tuple[str, str, int], Counts] = {}  # what the counts log has, per minute

    def replay(self, endpoint: str, version: str, minutes: dict[int, Counts], records: list[ComparisonRecord]) -> None:
        """Put back history an earlier process recorded (its counts are on disk already: not exported again)."""
        with self._lock:
            series = self._get(endpoint, version)
            for minute, counts in minutes.items():
                into = series.minutes.setdefault(minute, Counts())
                into.add(counts)
                self._exported.setdefault((endpoint, version, minute), Counts()).add(counts)
            series.records.extend(records)

    def export(self, *, everything: bool = False) -> list[tuple[str, str, int, Counts]]:
        """Counts not exported yet, per series and minute, for the counts log.

        Finished minutes only, unless `everything` (at shutdown). Each call returns what was
        counted since the last, so the lines on disk add up to the counts.
        """
        current = int(self._clock() // 60)
        out = []
        with self._lock:
            for (endpoint, version), series in self._series.items():
                for minute, counts in series.minutes.items():
                    if minute >= current and not everything:
                        continue
                    done = self._exported.setdefault((endpoint, version, minute), Counts())
                    delta = counts.minus(done)
                    if delta.total:
                        out.append((endpoint, version, minute, delta))
                        done.add(delta)
            live = {(e, v, m) for (e, v), series in self._series.items() for m in series.minutes}
            self._exported = {k: c for k, c in self._exported.items() if k in live}
        return out

    def _get(self, endpoint: str, version: str) -> _Series:
        """The series of a shadow (created on first use); call with the lock held."""
        key = (endpoint, version)
        series = self._series.get(key)
        if series is None:  # not setdefault: that would build a _Series (and its deque) on every call
            series = self._series[key] = _Series(self._records)
        return series

    def _read(self, endpoint: str, version: str) -> _Series:
        """The series of a shadow, or an empty one; a read never makes a version a shadow seen here."""
        series = self._series.get((endpoint, version))
        return series if series is not None else _Series(self._records)

    def mirrored(self, endpoint: str, version: str) -> None:
        """A copy was sampled for the shadow."""
        with self._lock:
            series = self._get(endpoint, version)
            series.total.mirrored += 1
            series.bucket(self._clock()).mirrored += 1

    def dropped(self, endpoint: str, version: str) -> None:
        """A copy was shed because the queue was full."""
        with self._lock:
            series = self._get(endpoint, version)
            series.total.dropped += 1
            series.bucket(self._clock()).dropped += 1

    def failed(self, endpoint: str, version: str, code: str) -> None:
        """The shadow run failed with a status code."""
        with self._lock:
            series = self._get(endpoint, version)
            for counts in (series.total, series.bucket(self._clock())):
                counts.errors[code] = counts.errors.get(code, 0) + 1

    def compared_many(self, endpoint: str, version: str, records: list[ComparisonRecord]) -> None:
        """The shadow ran and its outputs were compared, for each of these records (one lock)."""
        with self._lock:
            series = self._get(endpoint, version)
            series.total.compared += len(records)
            for record in records:
                series.bucket(record.at).compared += 1
            series.records.extend(records)

    def totals(self, endpoint: str, version: str) -> tuple[int, int, int, dict[str, int]]:
        """Cumulative (mirrored, compared, dropped, errors by code)."""
        with self._lock:
            total = self._read(endpoint, version).total
            return total.mirrored, total.compared, total.dropped, dict(total.errors)

    def shadows(self) -> list[tuple[str, str]]:
        """Every (endpoint, shadow version) seen."""
        with self._lock:
            return list(self._series)

    def summary(self, endpoint: str, version: str, window_seconds: int = 3600, top: int = 10) -> ShadowSummary:
        """Comparisons of a shadow in this process over the last `window_seconds`, as mergeable counts."""
        now = self._clock()
        since = now - window_seconds
        with self._lock:
            seen = (endpoint, version) in self._series
            series = self._series.get((endpoint, version)) or _Series(0)  # a report creates no series
            first_minute = int(since // 60)
            counts = [c for m, c in series.minutes.items() if m >= first_minute]
            records = [r for r in series.records if r.at >= since]
        summary = ShadowSummary(endpoint, version, window_seconds, seen=seen)
        for c in counts:
            summary.mirrored += c.mirrored
            summary.compared += c.compared
            summary.dropped += c.dropped
            _add(summary.errors, c.errors)
        for r in records:
            summary.decisions += r.rows
            summary.agree += r.agree
            _add(summary.diff_bins, {diff_bin(r.max_abs): 1})
            if math.isfinite(r.shadow_seconds) and math.isfinite(r.primary_seconds):  # timed on both sides
                summary.latency_samples += 1
                _add(summary.primary_latency, {latency_bin(r.primary_seconds): 1})
                _add(summary.shadow_latency, {latency_bin(r.shadow_seconds): 1})
            summary.primary_versions.add(r.primary_version)
        if records:
            summary.diff_max = max(r.max_abs for r in records)
        summary.diff_decades = [count for _, count in diff_histogram([r.max_abs for r in records])]
        summary.top = _most_divergent(((r.request_id, r.max_abs) for r in records), top)
        return summary

    def report(self, endpoint: str, version: str, window_seconds: int = 3600, top: int = 10) -> ShadowReport:
        """A report of a shadow in this process alone (the fleet report adds the other processes' summaries first)."""
        return self.summary(endpoint, version, window_seconds, top).report()
