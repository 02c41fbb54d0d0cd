"""Sliding windows on a simulated clock: expiry, quantile error bound, memory bound, NaN rates."""

from __future__ import annotations

import math
import random
import tracemalloc

import numpy as np
import pytest

from gateway.clock import SimClock
from gateway.telemetry.windows import BINS, RELATIVE_ERROR, SeriesKey, SlidingWindow, WindowStore


def test_counts_expire_after_the_window() -> None:
    clock = SimClock()
    window = SlidingWindow(300, clock=clock)
    for _ in range(10):
        window.record(0.001, "OK")
    window.record(0.001, "INTERNAL")
    window.record(0.001, "INVALID_ARGUMENT")
    clock.advance(60)
    for _ in range(5):
        window.record(0.002, "OK")
    last_minute = window.stats(60)
    assert (last_minute.requests, last_minute.errors) == (5, 0)
    everything = window.stats(300)
    assert (everything.requests, everything.errors, everything.client_errors) == (17, 1, 1)
    assert everything.error_rate == pytest.approx(1 / 17)
    clock.advance(241)  # the first second is now 301 s old
    assert window.stats(300).requests == 5
    clock.advance(300)
    assert window.stats(300).requests == 0
    assert math.isnan(window.stats(300).quantile(0.95))


def test_a_slot_is_reused_after_a_full_lap() -> None:
    clock = SimClock()
    window = SlidingWindow(10, clock=clock)
    window.record(0.001, "OK")
    clock.advance(10)  # same slot index, a different second
    window.record(0.001, "INTERNAL")
    stats = window.stats(10)
    assert (stats.requests, stats.errors) == (1, 1)


@pytest.mark.parametrize("distribution", ["lognormal", "uniform", "bimodal"])
def test_quantiles_are_within_the_relative_error_bound(distribution: str) -> None:
    rng = np.random.default_rng(1)
    values = {
        "lognormal": rng.lognormal(mean=-7, sigma=1.0, size=50_000),
        "uniform": rng.uniform(0.0005, 0.05, size=50_000),
        "bimodal": np.concatenate([rng.normal(0.002, 0.0002, 40_000), rng.normal(0.2, 0.02, 10_000)]).clip(1e-5),
    }[distribution]
    clock = SimClock()
    window = SlidingWindow(600, clock=clock)
    for i, value in enumerate(values):
        if i % 1000 == 0:
            clock.advance(1)
        window.record(float(value), "OK")
    stats = window.stats(600)
    for q in (0.5, 0.9, 0.95, 0.99):
        exact = float(np.quantile(values, q, method="lower"))
        estimate = stats.quantile(q)
        assert abs(estimate - exact) <= RELATIVE_ERROR * exact * 1.01, (q, exact, estimate)


@pytest.mark.slow
def test_memory_is_bounded_and_independent_of_traffic() -> None:
    clock = SimClock()
    rng = random.Random(3)

    def footprint(requests: int) -> int:
        window = SlidingWindow(120, features=32, clock=clock)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        per_second = max(requests // 240, 1)
        for i in range(requests):
            if i % per_second == 0:
                clock.advance(1)
            window.record(rng.lognormvariate(-6, 1), "OK", rows=1, nan_per_feature=[0] * 32)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return used

    small, large = footprint(5_000), footprint(200_000)
    assert large < small * 1.1 + 10_000, (small, large)
    # The hard bound: 120 slots, each one array of BINS 32-bit counters plus small counters.
    assert large < 120 * (BINS * 4 + 32 * 40 + 1_000), large


def test_nan_rates_per_feature() -> None:
    clock = SimClock()
    window = SlidingWindow(600, features=3, clock=clock)
    window.record(0.001, "OK", rows=100, nan_per_feature=[0, 5, 0])
    window.record(0.001, "OK", rows=100, nan_per_feature=None)
    stats = window.stats(600)
    assert stats.rows == 200
    assert [stats.nan_rate(i) for i in range(3)] == [0.0, 0.025, 0.0]


def test_shadow_agreement() -> None:
    clock = SimClock()
    window = SlidingWindow(60, clock=clock)
    for agree in (1, 1, 1, 0):
        window.record_comparison(agree)
    window.record_comparison(3, decisions=4)
    stats = window.stats(60)
    assert (stats.compared, stats.agree, stats.agreement_rate) == (8, 6, 0.75)


def test_store_keeps_weighted_and_pinned_series_apart() -> None:
    store = WindowStore(60, clock=SimClock())
    store.window(SeriesKey("ctr-ranker", "1.13")).record(0.001, "INTERNAL")
    store.window(SeriesKey("ctr-ranker", "1.13", pinned=True)).record(0.001, "OK")
    assert store.window(SeriesKey("ctr-ranker", "1.13")).stats(60).errors == 1
    assert store.window(SeriesKey("ctr-ranker", "1.13", pinned=True)).stats(60).errors == 0
    assert len(list(store.keys())) == 2


def test_a_window_made_before_any_request_counts_nans_once_features_arrive() -> None:
    clock = SimClock()
    store = WindowStore(600, clock=clock)
    window = store.window(SeriesKey("ctr-ranker", "1.13"))  # the guardian looked first: no features known
    window.record(0.001, "OK", rows=10)
    clock.advance(1)
    window.record(0.001, "OK", rows=10, nan_per_feature=[0, 4, 0])
    stats = window.stats(600)  # the window starts at a snapshot taken before the counters existed
    assert stats.nan_counts == (0, 4, 0) and stats.nan_rate(1) == 0.2
    assert window.stats(1).nan_counts == (0, 4, 0)
    stable = store.window(SeriesKey("ctr-ranker", "1.12"))
    store.window(SeriesKey("ctr-ranker", "1.12"), 3).record(0.001, "OK", rows=10)  # no NaN: counters from the model
    assert stable.stats(600).nan_counts == (0, 0, 0)


def test_outcome_totals_outlive_the_window() -> None:
    clock = SimClock()
    window = SlidingWindow(10, clock=clock)
    for value in (1.0, 0.0, 1.0):
        window.record_outcome(value)
        clock.advance(10)
    assert window.stats(10).outcomes == 0
    assert window.outcome_totals() == (3, 2.0)


class CountingSlots(list):  # type: ignore[type-arg]
    """The window's ring, counting how many slots a query reads."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        CountingSlots.reads += 1
        return super().__getitem__(index)


def test_a_query_reaching_before_the_first_event_or_after_the_last_reads_few_slots() -> None:
    """The docstring's O(1) per query held only once a window was full of traffic: a new canary's
    30-minute window walked up to 1,800 empty seconds on every guardian tick (found measuring the
    CTR rule through the guardian, where it was most of a tick's time)."""
    clock = SimClock()
    window = SlidingWindow(1800, clock=clock)
    window._slots = CountingSlots(window._slots)
    for _ in range(10):  # a new series: ten seconds of traffic
        window.record(0.001, "OK")
        clock.advance(1)
    CountingSlots.reads = 0
    assert window.stats(1800).requests == 10
    assert CountingSlots.reads <= 2
    clock.advance(1200)  # idle since
    CountingSlots.reads = 0
    assert window.stats(60).requests == 0 and window.stats(1800).requests == 10
    assert CountingSlots.reads <= 2
