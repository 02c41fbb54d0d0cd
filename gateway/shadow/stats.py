"""Shadow accounting and comparison records, kept in memory with bounded size."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

HORIZON_SECONDS = 24 * 3600


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
    primary_seconds: float
    shadow_seconds: float


@dataclass
class _Counts:
    mirrored: int = 0
    dropped: int = 0
    compared: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class _Series:
    """Per-minute counters over the horizon, cumulative counters, and the newest records."""

    def __init__(self, records: int) -> None:
        self.total = _Counts()
        self.minutes: dict[int, _Counts] = {}
        self.records: deque[ComparisonRecord] = deque(maxlen=records)

    def bucket(self, now: float) -> _Counts:
        minute = int(now // 60)
        counts = self.minutes.get(minute)
        if counts is None:
            counts = self.minutes[minute] = _Counts()
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


def _quantiles(values: list[float], scale: float = 1.0) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    array = np.asarray(values, dtype=np.float64) * scale
    with np.errstate(invalid="ignore"):
        quantiles = np.quantile(array, [0.5, 0.95, 0.99])
    # A diff can be +inf (NaN on one side, a shape mismatch): numpy interpolates towards it as NaN.
    p50, p95, p99 = np.where(np.isnan(quantiles), np.inf, quantiles)
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(array.max())}


class ShadowStats:
    """Counts every mirrored copy exactly once and keeps the newest comparison records."""

    def __init__(self, *, records: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records = records
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()

    def _get(self, endpoint: str, version: str) -> _Series:
        """The series of a shadow (created on first use); call with the lock held."""
        key = (endpoint, version)
        series = self._series.get(key)
        if series is None:  # not setdefault: that would build a _Series (and its deque) on every call
            series = self._series[key] = _Series(self._records)
        return series

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
            total = self._get(endpoint, version).total
            return total.mirrored, total.compared, total.dropped, dict(total.errors)

    def shadows(self) -> list[tuple[str, str]]:
        """Every (endpoint, shadow version) seen."""
        with self._lock:
            return list(self._series)

    def report(self, endpoint: str, version: str, window_seconds: int = 3600, top: int = 10) -> ShadowReport:
        """The numbers a person reads to decide whether the shadow can become a canary."""
        now = self._clock()
        since = now - window_seconds
        with self._lock:
            series = self._get(endpoint, version)
            first_minute = int(since // 60)
            counts = [c for m, c in series.minutes.items() if m >= first_minute]
            records = [r for r in series.records if r.at >= since]
        errors: dict[str, int] = {}
        for c in counts:
            for code, n in c.errors.items():
                errors[code] = errors.get(code, 0) + n
        decisions = sum(r.rows for r in records)
        agree = sum(r.agree for r in records)
        divergent = sorted(records, key=lambda r: r.max_abs, reverse=True)[:top]
        return ShadowReport(
            endpoint=endpoint,
            shadow_version=version,
            window_seconds=window_seconds,
            mirrored=sum(c.mirrored for c in counts),
            compared=sum(c.compared for c in counts),
            dropped=sum(c.dropped for c in counts),
            errors=errors,
            decisions=decisions,
            agree=agree,
            agreement_rate=agree / decisions if decisions else math.nan,
            agreement_ci=wilson_interval(agree, decisions),
            diff_quantiles=_quantiles([r.max_abs for r in records]),
            primary_latency_ms={
                k: v for k, v in _quantiles([r.primary_seconds for r in records], 1000).items() if k != "max"
            },
            shadow_latency_ms={
                k: v for k, v in _quantiles([r.shadow_seconds for r in records], 1000).items() if k != "max"
            },
            top_divergent=[(r.request_id, r.max_abs) for r in divergent],
            primary_versions=sorted({r.primary_version for r in records}),
            diff_histogram=diff_histogram([r.max_abs for r in records]),
        )
