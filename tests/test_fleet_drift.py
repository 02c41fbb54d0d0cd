"""Drift histograms across processes: one set of bins agreed in the store, and the leader's sum of every process's.

Simulated processes: a DriftTracker each on one shared fake clock, pulled as the wire carries
them; the store is a real SQLite file (and etcd for the agreement on bins).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from gateway.clock import SimClock
from gateway.desired import DesiredState, EndpointState
from gateway.grpc.fleet import pulled, window_counts
from gateway.orchestration.fleet import Member
from gateway.orchestration.fleet_drift import KIND, SharedBins, decode_bins
from gateway.orchestration.fleet_windows import FleetWindows, Pulled
from gateway.pb.gateway.v1 import fleet_pb2
from gateway.state import StateStore, open_store
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.drift import FEATURE_BINS, SCORE_BINS, SLOT_SECONDS, DriftBins, DriftTracker, HistogramStats
from gateway.telemetry.windows import WindowStore

INPUTS = (("features", 4),)
HORIZON = 600


def observe(tracker: DriftTracker, version: str, arm: str, rows: np.ndarray) -> None:
    scores = rows[:, :1].sum(axis=1, keepdims=True)  # a score per row: the first feature
    tracker.observe("ep", version, arm, INPUTS, {"features": rows}, scores)


class Processes:
    """Simulated processes sharing fixed bins (a reference): each a real DriftTracker and WindowStore."""

    def __init__(self, count: int, clock: SimClock, reference: DriftBins | None = None) -> None:
        self.clock = clock
        self.trackers = {f"p{i}": DriftTracker(HORIZON, clock=clock, warmup_rows=100) for i in range(count)}
        self.windows = {name: WindowStore(HORIZON, clock=clock) for name in self.trackers}
        self.members = [Member(name, name, f"127.0.0.1:{i}", 0.0) for i, name in enumerate(self.trackers)]
        self.silent: set[str] = set()
        rng = np.random.default_rng(0)
        reference = reference or DriftBins.from_sample(rng.normal(size=(500, 4)), rng.normal(size=500), "ref")
        for tracker in self.trackers.values():
            tracker.set_references({"ep": reference})
            tracker.track(["ep"])

    def pull(self, asks: Sequence[tuple[Member, int]]) -> list[Pulled | None]:
        """As the wire carries them (so the converters are in the loop too)."""
        answers: list[Pulled | None] = []
        for member, since in asks:
            if member.id in self.silent:
                answers.append(None)
                continue
            now, series = self.windows[member.id].export(since)
            answer = window_counts(now, series, (), self.trackers[member.id].export(since))
            answers.append(pulled(fleet_pb2.WindowCounts.FromString(answer.SerializeToString())))
        return answers

    def traffic(self, rng: random.Random) -> None:
        for tracker in self.trackers.values():
            for _ in range(rng.randrange(0, 3)):
                version, arm = rng.choice([("1.12", "stable"), ("1.13", "canary")])
                rows = np.random.default_rng(rng.randrange(1 << 30)).normal(size=(rng.randrange(1, 5), 4))
                rows[rows[:, 1] > 1.5, 1] = np.nan
                observe(tracker, version, arm, rows.astype(np.float32))


def assert_sum(merged: HistogramStats | None, parts: list[HistogramStats | None]) -> None:
    held = [p for p in parts if p is not None]
    assert merged is not None and held
    assert np.array_equal(merged.features, sum(p.features for p in held))
    assert np.array_equal(merged.scores, sum(p.scores for p in held))
    assert merged.rows == sum(p.rows for p in held)


def test_the_leaders_histograms_are_the_sum_of_every_process_whatever_the_pull_timing() -> None:
    clock = SimClock()
    fleet = Processes(3, clock)
    leader = FleetWindows(fleet.windows["p0"], "p0", fleet.pull, drift=fleet.trackers["p0"])
    rng = random.Random(5)
    for step in range(900):  # 225 s in quarter seconds: pulls land inside slots that are still counting
        fleet.traffic(rng)
        fleet.silent = {"p2"} if 300 <= step < 380 else set()  # one process misses 20 seconds of pulls
        if step % 3 == 0:
            leader.refresh(fleet.members)
        clock.advance(0.25)
    clock.advance(SLOT_SECONDS)  # the last slot with traffic is over: every process gives it whole
    leader.refresh(fleet.members)
    assert leader.histograms is not None
    for version in ("1.12", "1.13"):
        for seconds in (10, 60, 200, HORIZON):
            parts = [t.window("ep", version, seconds) for t in fleet.trackers.values()]
            assert_sum(leader.histograms.window("ep", version, seconds), parts)
    # A new leader's first pull brings every process's whole history.
    successor = FleetWindows(fleet.windows["p1"], "p1", fleet.pull, drift=fleet.trackers["p1"])
    successor.refresh(fleet.members)
    assert successor.histograms is not None
    parts = [t.window("ep", "1.13", HORIZON) for t in fleet.trackers.values()]
    assert_sum(successor.histograms.window("ep", "1.13", HORIZON), parts)


def test_histograms_on_other_bins_are_kept_apart() -> None:
    clock = SimClock()
    fleet = Processes(2, clock)
    rng = np.random.default_rng(3)
    odd = DriftBins.from_sample(rng.normal(5, 1, size=(500, 4)), rng.normal(size=500), "its own warm-up")
    fleet.trackers["p1"].set_references({"ep": odd})  # a process still on bins of its own
    leader = FleetWindows(fleet.windows["p0"], "p0", fleet.pull, drift=fleet.trackers["p0"])
    for tracker in fleet.trackers.values():
        observe(tracker, "1.13", "canary", rng.normal(size=(50, 4)).astype(np.float32))
    clock.advance(SLOT_SECONDS)
    leader.refresh(fleet.members)
    assert leader.histograms is not None
    merged = leader.histograms.window("ep", "1.13", 60)
    assert merged is not None and merged.rows == 50  # only p0's: p1's count on other bins
    # p1 adopts the fleet's bins: from then on its rows add up.
    placement = fleet.trackers["p0"].placement("ep")
    assert placement is not None and placement.bins is not None
    fleet.trackers["p1"].set_references({"ep": placement.bins})
    fleet.trackers["p1"].track(["ep"])
    observe(fleet.trackers["p1"], "1.13", "canary", rng.normal(size=(30, 4)).astype(np.float32))
    leader.refresh(fleet.members)
    merged = leader.histograms.window("ep", "1.13", 60)
    assert merged is not None and merged.rows == 50  # p1's slot is still counting: it crosses once it is over
    clock.advance(SLOT_SECONDS)
    leader.refresh(fleet.members)
    merged = leader.histograms.window("ep", "1.13", 60)
    assert merged is not None and merged.rows == 80


def test_the_wire_keeps_every_counter_trailing_zeros_too() -> None:
    clock = SimClock()
    tracker = DriftTracker(HORIZON, clock=clock)
    rng = np.random.default_rng(1)
    tracker.set_references({"ep": DriftBins.from_sample(rng.normal(size=(100, 4)), None, "ref")})
    tracker.track(["ep"])
    tracker.observe("ep", "1.12", "stable", INPUTS, {"features": rng.normal(size=(7, 4))}, None)  # no scores
    assert tracker.export(0) == {}  # its slot is still counting
    clock.advance(SLOT_SECONDS)
    exported = tracker.export(0)
    answer = pulled(fleet_pb2.WindowCounts.FromString(window_counts(0, {}, (), exported).SerializeToString()))
    assert answer.histograms.keys() == exported.keys()
    ((key, slots),) = answer.histograms.items()
    assert len(slots[0][1]) == 4 * (FEATURE_BINS + 1) + 2 * (SCORE_BINS + 1)
    assert np.array_equal(slots[0][1], exported[key][0][1])


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    opened = (
        SqliteStore(tmp_path / "state.db")
        if request.param == "sqlite"
        else open_store(request.getfixturevalue("etcd").url())
    )
    yield opened
    opened.close()


def routes(stable: str) -> DesiredState:
    ep = EndpointState(name="ep", artifacts={}, weights={stable: 100}, labels={"stable": stable})
    return DesiredState({"ep": ep})


def test_every_process_adopts_the_bins_the_first_one_learnt(store: StateStore) -> None:
    clock = SimClock()
    trackers = [DriftTracker(HORIZON, clock=clock, warmup_rows=100) for _ in range(3)]
    shared = [SharedBins(store, tracker, clock) for tracker in trackers]
    for tracker in trackers:
        tracker.track(["ep"])
    rng = np.random.default_rng(7)
    # Each process learns from its own stable rows; the second finishes first.
    observe(trackers[1], "1.12", "stable", rng.normal(size=(100, 4)).astype(np.float32))
    observe(trackers[0], "1.12", "stable", rng.normal(1, 2, size=(100, 4)).astype(np.float32))
    observe(trackers[0], "1.13", "canary", rng.normal(size=(10, 4)).astype(np.float32))
    observe(trackers[2], "1.12", "stable", rng.normal(size=(40, 4)).astype(np.float32))  # still learning
    for sync in (shared[1], shared[0], shared[2]):
        sync.sync(routes("1.12"))
    digests = {tracker.digest("ep") for tracker in trackers}
    assert len(digests) == 1 and "" not in digests  # the same bins everywhere, the learner's too
    stored = store.get_record(KIND, "ep@1.12")
    assert stored is not None and decode_bins(stored).digest == digests.pop()
    assert trackers[0].window("ep", "1.13", 60) is None  # counted on its own bins: thrown away
    assert all(t.placement("ep").shared == "ep@1.12" for t in trackers)  # type: ignore[union-attr]
    assert "for the fleet" in trackers[0].source("ep")
    observe(trackers[2], "1.12", "stable", rng.normal(size=(100, 4)).astype(np.float32))  # learns no more
    assert trackers[2].placement("ep").learning is False  # type: ignore[union-attr]

    # A new stable places new bins, once for the fleet.
    for sync in shared:
        sync.sync(routes("1.14"))
    assert all(t.placement("ep").bins is None for t in trackers)  # type: ignore[union-attr]
    observe(trackers[2], "1.14", "stable", rng.normal(3, 1, size=(100, 4)).astype(np.float32))
    for sync in (shared[2], shared[0], shared[1]):
        sync.sync(routes("1.14"))
    assert len({t.digest("ep") for t in trackers} - {""}) == 1
    assert store.get_record(KIND, "ep@1.14") is not None


def test_bins_a_reference_placed_never_touch_the_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    tracker = DriftTracker(HORIZON, clock=SimClock())
    rng = np.random.default_rng(1)
    tracker.set_references({"ep": DriftBins.from_sample(rng.normal(size=(100, 4)), rng.normal(size=100), "ref")})
    tracker.track(["ep"])
    SharedBins(store, tracker).sync(routes("1.12"))
    assert store.list_records(KIND) == []
    store.close()
