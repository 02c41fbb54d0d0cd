"""Drift histograms per series (bins learnt or from a reference, fixed memory, windows) and the memory ring."""

from __future__ import annotations

import numpy as np

from gateway.clock import SimClock
from gateway.guardrails.drift import psi
from gateway.telemetry.drift import FEATURE_BINS, SCORE_BINS, SLOT_SECONDS, DriftBins, DriftTracker, Histograms
from gateway.telemetry.memory import MemoryWindow, rss_bytes

INPUTS = (("features", 4),)


def observe(tracker: DriftTracker, version: str, arm: str, rows: np.ndarray, scores: np.ndarray | None = None) -> None:
    for row in range(len(rows)):
        score = None if scores is None else scores[row : row + 1, None]
        tracker.observe("ep", version, arm, INPUTS, {"features": rows[row : row + 1]}, score)


def test_bins_are_learnt_from_stable_then_every_weighted_version_is_counted() -> None:
    clock = SimClock()
    tracker = DriftTracker(600, clock=clock, warmup_rows=200)
    rng = np.random.default_rng(1)
    observe(tracker, "1.13", "canary", rng.normal(size=(50, 4)).astype(np.float32))  # not tracked yet
    assert tracker.window("ep", "1.13", 60) is None and "no drift rule" in tracker.status("ep")
    tracker.track(["ep"])
    observe(
        tracker, "1.13", "canary", rng.normal(size=(50, 4)).astype(np.float32), rng.random(50)
    )  # not stable: no learning
    assert "0 of 200 rows" in tracker.status("ep")
    observe(tracker, "1.12", "stable", rng.normal(size=(150, 4)).astype(np.float32), rng.random(150))
    assert "150 of 200 rows" in tracker.status("ep")
    observe(tracker, "1.12", "stable", rng.normal(size=(50, 4)).astype(np.float32), rng.random(50))
    assert tracker.status("ep") == "" and tracker.source("ep") == "learnt from the first 200 rows stable (1.12) served"
    shifted = rng.normal(size=(300, 4)).astype(np.float32)
    shifted[:, 2] *= 100  # an upstream unit change on one feature
    shifted[::10, 1] = np.nan
    observe(tracker, "1.13", "canary", shifted, rng.random(300))
    observe(tracker, "1.12", "stable", rng.normal(size=(300, 4)).astype(np.float32), rng.random(300))
    canary, stable = tracker.window("ep", "1.13", 600), tracker.window("ep", "1.12", 600)
    assert canary is not None and stable is not None
    assert canary.features.shape == (4, FEATURE_BINS + 1) and canary.rows == 300
    assert stable.rows == 301  # the request that completed the warm-up is the first one counted
    assert canary.scored == 300 and len(canary.scores) == SCORE_BINS + 1 and canary.paired == 0
    assert canary.features[1, FEATURE_BINS] == 30  # NaN has its own bin
    drifts = [psi(stable.features[f], canary.features[f]) for f in range(4)]
    assert drifts[2] > 1 and max(drifts[0], drifts[3]) < 0.2
    assert tracker.window("ep", "1.14", 600) is None
    tracker.track([])  # the rule is gone: nothing is kept
    assert tracker.window("ep", "1.12", 600) is None


def test_a_reference_places_the_bins_at_once_and_a_shape_mismatch_is_reported() -> None:
    clock = SimClock()
    tracker = DriftTracker(600, clock=clock)
    rng = np.random.default_rng(2)
    reference = DriftBins.from_sample(rng.normal(size=(1000, 4)), rng.random(1000), "reference ref.npz")
    tracker.set_references({"ep": reference})
    tracker.track(["ep"])
    observe(tracker, "1.13", "canary", rng.normal(size=(10, 4)).astype(np.float32), rng.random(10))
    stats = tracker.window("ep", "1.13", 60)
    assert stats is not None and stats.rows == 10 and stats.scored == 10 and tracker.source("ep") == "reference ref.npz"
    tracker.observe("ep", "1.14", "canary", (("features", 3),), {"features": np.zeros((1, 3), np.float32)}, None)
    assert "1.14 has 3 input features but the drift bins have 4 (reference ref.npz)" in tracker.status("ep")


def test_windows_forget_old_slots_and_batches_are_counted_whole() -> None:
    clock = SimClock(1_000_000.0)
    edges = np.tile(np.linspace(-1, 1, FEATURE_BINS - 1), (2, 1))
    histograms = Histograms(120, edges, np.linspace(0, 1, SCORE_BINS - 1), clock)
    two = (("x", 2),)
    for _ in range(100):  # more requests than are staged before binning
        histograms.add(two, {"x": np.zeros((1, 2))}, np.full((1, 1), 0.5))
    clock.advance(60)
    histograms.add(two, {"x": np.ones((3, 2))}, None)
    assert histograms.window(120).rows == 103 and histograms.window(120).scored == 100
    assert histograms.window(SLOT_SECONDS).rows == 3  # only this slot
    clock.advance(90)
    histograms.add(two, {"x": np.ones((1, 2))}, np.array([0.1]))
    assert histograms.window(120).rows == 4  # the first batch is older than the window
    assert histograms.window(10_000).seconds <= 120  # never more than the horizon
    histograms.add((("a", 1), ("b", 1)), {"a": np.zeros(5), "b": np.ones(5)}, None)  # two inputs, one column each
    assert histograms.window(SLOT_SECONDS).rows == 6


def test_shadows_count_their_scores_and_the_primary_scores_on_the_same_requests() -> None:
    tracker = DriftTracker(600, clock=SimClock(), warmup_rows=100)
    rng = np.random.default_rng(3)
    tracker.track(["ep"])
    tracker.observe_shadow("ep", "2.0", rng.random((5, 1)), rng.random((5, 1)))  # no bins yet: ignored
    observe(tracker, "1.12", "stable", rng.normal(size=(100, 4)).astype(np.float32), rng.random(100))
    tracker.observe_shadow("ep", "2.0", rng.random((40, 1)) * 0.5, rng.random((40, 1)))
    stats = tracker.window("ep", "2.0", 60)
    assert stats is not None and stats.scored == 40 and stats.paired == 40 and stats.rows == 0


def test_memory_ring_reports_growth_since_a_moment_within_a_window() -> None:
    clock = SimClock(1_000_000.0)
    readings = iter([500, 400, 450, 700, 900])
    memory = MemoryWindow(60, clock=clock, reader=lambda: next(readings) * 1_000_000)
    for _ in range(5):
        memory.sample()
        clock.advance(1)
    clock.advance(-1)
    grown = memory.growth(60)
    assert (grown.grown_bytes, grown.samples, grown.lowest_bytes, grown.latest_bytes) == (500e6, 5, 400e6, 900e6)
    assert memory.growth(60, since=clock.now - 1).grown_bytes == 200e6  # only the last two samples
    assert memory.growth(2).samples == 2 and memory.latest() == 900e6
    clock.advance(600)
    assert memory.growth(60).samples == 0
    assert rss_bytes() > 10_000_000  # this process, really
