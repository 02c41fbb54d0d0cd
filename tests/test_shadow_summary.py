"""Shadow summaries add up across processes: the fleet's report is one process's report of all the records."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from gateway.clock import SimClock
from gateway.shadow.stats import ComparisonRecord, ShadowStats, bin_quantiles, diff_bin, diff_bin_value


def _record(rng: random.Random, clock: SimClock, i: int) -> ComparisonRecord:
    diff = rng.choice([0.0, math.inf, rng.lognormvariate(-5, 2)])
    return ComparisonRecord(
        clock.now, f"r{i:04d}", rng.choice(["1.12", "1.13"]), diff, diff / 2, 0.0, 2, rng.randrange(0, 3),
        rng.lognormvariate(-7, 0.5), rng.lognormvariate(-6, 0.5),
    )  # fmt: skip


def test_summaries_of_three_processes_merge_to_the_report_of_one_holding_everything() -> None:
    clock = SimClock(1_000_000.0)
    rng = random.Random(5)
    everything = ShadowStats(clock=clock)
    parts = [ShadowStats(clock=clock) for _ in range(3)]
    for i in range(600):
        record = _record(rng, clock, i)
        part = parts[i % 3]
        for stats in (everything, part):
            stats.mirrored("ranker", "2.0")
            stats.compared_many("ranker", "2.0", [record])
        if i % 50 == 0:
            for stats in (everything, part):
                stats.mirrored("ranker", "2.0")
                stats.failed("ranker", "2.0", "INTERNAL")
        clock.now += 1
    whole = everything.summary("ranker", "2.0", 3600, 5).report()
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        merged = parts[order[0]].summary("ranker", "2.0", 3600, 5)
        for index in order[1:]:
            merged.merge(parts[index].summary("ranker", "2.0", 3600, 5), 5)
        # Every merge order gives the same answer: one process's holding every record, from 3 processes.
        assert merged.report() == dataclasses.replace(whole, processes=3)


def test_binned_quantiles_stay_within_two_percent() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(-4, 2, 5000)
    bins: dict[int, int] = {}
    for value in values:
        bins[diff_bin(float(value))] = bins.get(diff_bin(float(value)), 0) + 1
    quantiles = bin_quantiles(bins, diff_bin_value)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert quantiles[name] == pytest.approx(float(np.quantile(values, q)), rel=0.02)
    assert diff_bin_value(diff_bin(0.0)) == 0.0 and diff_bin_value(diff_bin(math.inf)) == math.inf
    assert diff_bin_value(diff_bin(math.nan)) == math.inf
