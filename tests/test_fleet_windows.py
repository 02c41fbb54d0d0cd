"""The leader's merged windows equal the sum of every process's, whatever the pull timing (simulated processes)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.clock import SimClock
from gateway.orchestration.fleet import Member
from gateway.orchestration.fleet_windows import FleetWindows, Pulled
from gateway.telemetry.windows import SeriesKey, WindowStats, WindowStore

CANARY, STABLE = SeriesKey("ctr-ranker", "1.13"), SeriesKey("ctr-ranker", "1.12")


class Processes:
    """Simulated processes: each a real WindowStore on one shared fake clock; pulls call their export."""

    def __init__(self, count: int, clock: SimClock, horizon: int = 300) -> None:
        self.clock = clock
        self.stores = {f"p{i}": WindowStore(horizon, clock=clock) for i in range(count)}
        self.members = [Member(name, name, f"127.0.0.1:{i}", 0.0) for i, name in enumerate(self.stores)]
        self.silent: set[str] = set()

    def pull(self, asks: Sequence[tuple[Member, int]]) -> list[Pulled | None]:
        answers: list[Pulled | None] = []
        for member, since in asks:
            if member.id in self.silent:
                answers.append(None)
                continue
            now, series = self.stores[member.id].export(since)
            answers.append(Pulled(now, series))
        return answers

    def traffic(self, rng: random.Random) -> None:
        for store in self.stores.values():
            for _ in range(rng.randrange(0, 4)):
                key = rng.choice([CANARY, STABLE])
                code = rng.choice(["OK", "OK", "OK", "INTERNAL", "INVALID_ARGUMENT"])
                nan = [rng.randrange(0, 2) for _ in range(4)]
                store.window(key, features=4).record(rng.lognormvariate(-6, 1), code, rows=2, nan_per_feature=nan)
                if rng.random() < 0.5:
                    store.window(key).record_outcome(rng.choice([0.0, 1.0]))
                if rng.random() < 0.2:
                    store.window(key).record_comparison(agree=rng.randrange(0, 3), decisions=2)


def assert_same(merged: WindowStats, parts: list[WindowStats]) -> None:
    for name in ("requests", "errors", "client_errors", "rows", "compared", "agree", "outcomes"):
        assert getattr(merged, name) == sum(getattr(p, name) for p in parts), name
    assert merged.outcome_sum == pytest.approx(sum(p.outcome_sum for p in parts))
    assert np.array_equal(merged.latency_bins, sum(p.latency_bins for p in parts))
    width = max(len(p.nan_counts) for p in parts)
    expected = [sum(p.nan_counts[i] if i < len(p.nan_counts) else 0 for p in parts) for i in range(width)]
    assert list(merged.nan_counts) == expected


def test_merged_windows_are_the_sum_of_every_process_whatever_the_pull_timing() -> None:
    clock = SimClock()
    fleet = Processes(3, clock)
    windows = FleetWindows(fleet.stores["p0"], "p0", fleet.pull)
    rng = random.Random(7)
    for step in range(600):  # 150 s in quarter seconds: pulls land inside seconds that are still counting
        fleet.traffic(rng)
        fleet.silent = {"p2"} if 200 <= step < 240 else set()  # one process misses ten seconds of pulls
        if step % 3 == 0:
            windows.refresh(fleet.members)
        clock.advance(0.25)
    windows.refresh(fleet.members)
    for key in (CANARY, STABLE):
        for seconds in (1, 5, 60, 149, 300):
            parts = [store.window(key).stats(seconds) for store in fleet.stores.values()]
            assert_same(windows.merged.window(key).stats(seconds), parts)
        outcomes = [store.window(key).outcome_totals() for store in fleet.stores.values()]
        merged_n, merged_sum = windows.merged.window(key).outcome_totals()
        assert merged_n == sum(n for n, _ in outcomes) and merged_sum == pytest.approx(sum(s for _, s in outcomes))


def test_a_new_leader_pulls_every_process_history_at_once() -> None:
    clock = SimClock()
    fleet = Processes(3, clock)
    rng = random.Random(3)
    for _ in range(200):
        fleet.traffic(rng)
        clock.advance(0.5)
    windows = FleetWindows(fleet.stores["p1"], "p1", fleet.pull)
    refresh = windows.refresh(fleet.members)
    assert (refresh.members, refresh.answered) == (3, 3)
    for seconds in (10, 100, 300):
        parts = [store.window(CANARY).stats(seconds) for store in fleet.stores.values()]
        assert_same(windows.merged.window(CANARY).stats(seconds), parts)
    again = windows.refresh(fleet.members)  # nothing new: nothing merged twice
    assert again.seconds <= 3 * 2  # at most each series' current second, re-pulled, and nothing added
    parts = [store.window(CANARY).stats(300) for store in fleet.stores.values()]
    assert_same(windows.merged.window(CANARY).stats(300), parts)


def test_a_process_that_left_keeps_what_it_counted() -> None:
    clock = SimClock()
    fleet = Processes(2, clock)
    windows = FleetWindows(fleet.stores["p0"], "p0", fleet.pull)
    fleet.stores["p1"].window(CANARY).record(0.01, "INTERNAL")
    windows.refresh(fleet.members)
    clock.advance(5)
    windows.refresh(fleet.members[:1])  # p1's lease ran out
    assert windows.merged.window(CANARY).stats(60).errors == 1
    clock.advance(60)
    assert windows.merged.window(CANARY).stats(60).errors == 0  # and it ages out like any count


def test_reset_starts_a_new_term_from_the_whole_history() -> None:
    clock = SimClock()
    fleet = Processes(2, clock)
    windows = FleetWindows(fleet.stores["p0"], "p0", fleet.pull)
    fleet.stores["p1"].window(STABLE).record(0.01, "OK")
    windows.refresh(fleet.members)
    old = windows.merged
    clock.advance(3)
    new = windows.reset()
    assert new is windows.merged and new is not old
    windows.refresh(fleet.members)
    assert new.window(STABLE).stats(60).requests == 1


def test_a_member_listed_again_after_a_gap_is_not_counted_twice() -> None:
    clock = SimClock()
    fleet = Processes(2, clock)
    windows = FleetWindows(fleet.stores["p0"], "p0", fleet.pull)
    rng = random.Random(9)
    for step in range(120):
        fleet.traffic(rng)
        # p1 drops off the members list for a while (its lease renewed late), then is back.
        windows.refresh(fleet.members if not 40 <= step < 60 else fleet.members[:1])
        clock.advance(1)
    windows.refresh(fleet.members)
    parts = [store.window(STABLE).stats(300) for store in fleet.stores.values()]
    assert_same(windows.merged.window(STABLE).stats(300), parts)


def test_a_member_first_seen_mid_term_brings_its_whole_history_in_one_pass() -> None:
    clock = SimClock()
    fleet = Processes(2, clock)
    windows = FleetWindows(fleet.stores["p0"], "p0", fleet.pull)
    rng = random.Random(4)
    for _ in range(250):
        fleet.traffic(rng)
        windows.refresh(fleet.members[:1])  # p1 cannot be listed yet (say, it has no address)
        clock.advance(1)
    refresh = windows.refresh(fleet.members)
    assert refresh.seconds > 200  # its backlog, merged behind the seconds already held
    for seconds in (10, 100, 300):
        parts = [store.window(CANARY).stats(seconds) for store in fleet.stores.values()]
        assert_same(windows.merged.window(CANARY).stats(seconds), parts)
