"""Output comparison and report statistics, computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.config import ShadowCompareConfig
from gateway.shadow.compare import compare_batch, compare_outputs
from gateway.shadow.stats import ComparisonRecord, ShadowStats, diff_histogram, wilson_interval


def test_scores_threshold_agreement_and_differences() -> None:
    primary = np.array([[0.2], [0.6], [0.49], [0.9]], dtype=np.float32)
    shadow = np.array([[0.25], [0.4], [0.51], [0.9]], dtype=np.float32)
    diff = compare_outputs({"score": primary}, {"score": shadow}, ShadowCompareConfig(threshold=0.5))
    assert diff.rows == 4
    assert diff.agree == 2  # rows 0 and 3; row 1 and row 2 cross the threshold
    assert diff.max_abs == pytest.approx(0.2, abs=1e-6)
    assert diff.mean_abs == pytest.approx((0.05 + 0.2 + 0.02 + 0.0) / 4, abs=1e-6)
    assert diff.max_rel == pytest.approx(0.2 / 0.6, rel=1e-5)


def test_batch_splits_per_request() -> None:
    primary = np.array([[0.2], [0.6], [0.49], [0.9]], dtype=np.float32)
    shadow = np.array([[0.25], [0.4], [0.51], [0.9]], dtype=np.float32)
    first, second = compare_batch({"score": primary}, {"score": shadow}, [1, 3], ShadowCompareConfig())
    assert (first.rows, first.agree, round(first.max_abs, 6)) == (1, 1, 0.05)
    assert (second.rows, second.agree, round(second.max_abs, 6)) == (3, 1, 0.2)
    assert second.outputs[0]["mean_abs"] == pytest.approx((0.2 + 0.02 + 0.0) / 3, abs=1e-6)


def test_classes_argmax_and_top_k() -> None:
    primary = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    shadow = np.array([[0.15, 0.6, 0.25], [0.3, 0.5, 0.2]])
    diff = compare_outputs({"probs": primary}, {"probs": shadow}, ShadowCompareConfig(top_k=2))
    assert diff.agree == 1
    assert diff.outputs[0]["top_k_overlap"] == pytest.approx(1.0)  # top-2 sets are {1, 2}/{1, 2} and {0, 1}/{1, 0}


def test_shape_mismatch_and_missing_outputs() -> None:
    diff = compare_outputs(
        {"a": np.zeros((2, 1)), "b": np.zeros((2, 1))}, {"a": np.zeros((3, 1))}, ShadowCompareConfig()
    )
    assert [o.get("shape_mismatch") for o in diff.outputs] == [True, True]
    assert diff.agree == 0 and math.isinf(diff.max_abs)


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(81, 100)
    assert (round(low, 4), round(high, 4)) == (0.7222, 0.8749)
    assert wilson_interval(0, 0)[0] != wilson_interval(0, 0)[0]  # NaN
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


class Clock:
    now = 10_000.0

    def __call__(self) -> float:
        return self.now


def test_report_numbers_match_a_hand_computed_case() -> None:
    clock = Clock()
    stats = ShadowStats(clock=clock)
    # Ten requests: diffs 0.00, 0.01, ..., 0.09; one row each; rows 7, 8, 9 disagree.
    for i in range(10):
        stats.mirrored("ranker", "2.0")
        stats.compared_many(
            "ranker",
            "2.0",
            [
                ComparisonRecord(
                    at=clock.now,
                    request_id=f"r{i}",
                    primary_version="1.0",
                    max_abs=i / 100,
                    mean_abs=i / 200,
                    max_rel=0.0,
                    rows=1,
                    agree=0 if i >= 7 else 1,
                    primary_seconds=0.001 * (i + 1),
                    shadow_seconds=0.002 * (i + 1),
                )
            ],
        )
    for _ in range(3):
        stats.mirrored("ranker", "2.0")
        stats.dropped("ranker", "2.0")
    stats.mirrored("ranker", "2.0")
    stats.failed("ranker", "2.0", "UNAVAILABLE")
    clock.now += 30
    report = stats.report("ranker", "2.0", window_seconds=600, top=3)
    assert (report.mirrored, report.compared, report.dropped, report.errors) == (
        14,
        10,
        3,
        {"UNAVAILABLE": 1},
    )
    assert report.mirrored == report.compared + report.dropped + report.shadow_errors
    assert (report.decisions, report.agree, report.agreement_rate) == (10, 7, 0.7)
    assert report.agreement_ci == pytest.approx(wilson_interval(7, 10))
    assert report.agreement_ci == pytest.approx((0.3968, 0.8922), abs=1e-4)  # Wilson 95% for 7 of 10, from tables
    diffs = [i / 100 for i in range(10)]
    # Quantiles come from logarithmic bins (mergeable across processes): within 2% of numpy's.
    assert report.diff_quantiles["p50"] == pytest.approx(float(np.quantile(diffs, 0.5)), rel=0.02)  # 0.045
    assert report.diff_quantiles["p95"] == pytest.approx(0.0855, rel=0.02)
    assert report.diff_quantiles["max"] == 0.09  # the maximum is exact
    assert report.primary_latency_ms["p50"] == pytest.approx(5.5, rel=0.02)
    assert report.shadow_latency_ms["p50"] == pytest.approx(11.0, rel=0.02)
    assert report.top_divergent == [("r9", 0.09), ("r8", 0.08), ("r7", 0.07)]
    assert report.primary_versions == ["1.0"]
    histogram = dict(report.diff_histogram)
    assert (histogram[0.0], histogram[0.01], histogram[0.1]) == (1, 1, 8)
    # A window that starts between the two minutes holds only the newer minute's counts and records.
    clock.now += 60
    stats.mirrored("ranker", "2.0")
    stats.dropped("ranker", "2.0")
    recent = stats.report("ranker", "2.0", window_seconds=60)
    assert (recent.mirrored, recent.compared, recent.dropped, recent.decisions) == (1, 0, 1, 0)
    assert math.isnan(recent.diff_quantiles["p50"]) and recent.top_divergent == []
    # Outside the window nothing counts.
    clock.now += 7200
    empty = stats.report("ranker", "2.0", window_seconds=600)
    assert (empty.mirrored, empty.compared) == (0, 0) and math.isnan(empty.agreement_rate)


def test_diff_histogram_edges() -> None:
    counts = dict(diff_histogram([0.0, 5e-7, 1e-6, 0.5, 3.0]))
    assert counts[0.0] == 1 and counts[1e-6] == 2 and counts[1.0] == 1 and counts[math.inf] == 1


def test_nan_outputs_are_the_largest_difference_and_keep_reports_sound() -> None:
    nan = math.nan
    # Four requests of two rows: equal; NaN on the shadow only; NaN on the primary only; NaN on both.
    primary = np.array([[0.1], [0.9], [0.2], [0.8], [nan], [0.3], [nan], [0.7]])
    shadow = np.array([[0.1], [0.9], [nan], [0.8], [0.4], [0.3], [nan], [0.6]])
    diffs = compare_batch({"score": primary}, {"score": shadow}, [2, 2, 2, 2], ShadowCompareConfig())
    assert [d.max_abs for d in diffs[:3]] == [0.0, math.inf, math.inf]
    assert [d.agree for d in diffs] == [2, 1, 1, 2]  # one-sided NaN disagrees; NaN on both sides agrees
    assert diffs[1].max_rel == math.inf and diffs[2].mean_abs == math.inf
    assert diffs[3].max_abs == pytest.approx(0.1) and diffs[3].outputs[0]["mean_abs"] == pytest.approx(0.05)
    classes = compare_outputs(
        {"p": np.array([[nan, 0.5], [np.inf, 0.1]])},
        {"p": np.array([[0.5, 0.5], [np.inf, 0.1]])},
        ShadowCompareConfig(),
    )
    assert (classes.max_abs, classes.agree) == (math.inf, 1)  # the same infinity is no difference
    assert classes.outputs[0]["max_rel"] == math.inf
    clock = Clock()
    stats = ShadowStats(clock=clock)
    stats.compared_many(
        "ranker",
        "2.0",
        [
            ComparisonRecord(clock.now, f"r{i}", "1.0", d.max_abs, d.mean_abs, d.max_rel, d.rows, d.agree, 0.001, 0.002)
            for i, d in enumerate(diffs)
        ],
    )
    report = stats.report("ranker", "2.0", top=2)
    assert report.diff_quantiles["max"] == math.inf and report.diff_quantiles["p50"] == math.inf
    assert not any(math.isnan(v) for v in report.diff_quantiles.values())
    assert report.top_divergent == [("r1", math.inf), ("r2", math.inf)]
    histogram = dict(report.diff_histogram)
    assert sum(histogram.values()) == 4 and (histogram[0.0], histogram[0.1], histogram[math.inf]) == (1, 1, 2)
    assert (report.decisions, report.agree) == (8, 6)
