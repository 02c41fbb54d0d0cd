from __future__ import annotations

import math

import pytest

from gateway.clock import SimClock
from gateway.errors import InvalidInput
from gateway.guardrails.rules import Action, Metric, RuleSet, parse_duration, parse_rule
from gateway.orchestration.evaluate import Status, evaluate
from gateway.telemetry.windows import SlidingWindow


@pytest.mark.parametrize(
    ("text", "metric", "threshold", "window", "min_samples", "alpha", "action", "feature"),
    [
        ("error_rate > 2% for 5m min 500", Metric.ERROR_RATE, 0.02, 300, 500, None, Action.ROLLBACK, ""),
        ("latency_p95_ratio > 1.3 for 10m", Metric.LATENCY_P95_RATIO, 1.3, 600, 100, None, Action.ROLLBACK, ""),
        ("latency_p99_ratio > 2x for 30s", Metric.LATENCY_P99_RATIO, 2.0, 30, 100, None, Action.ROLLBACK, ""),
        ("latency_p95_ms > 50ms for 5m", Metric.LATENCY_P95_MS, 50.0, 300, 100, None, Action.ROLLBACK, ""),
        ("ctr_drop > 5% p < 0.05 for 30m", Metric.CTR_DROP, 0.05, 1800, 100, 0.05, Action.ROLLBACK, ""),
        (
            "feature_null_rate_delta > 1pt for 10m",
            Metric.FEATURE_NULL_RATE_DELTA,
            0.01,
            600,
            100,
            None,
            Action.ROLLBACK,
            "",
        ),
        (
            "feature_null_rate_delta[features[7]] > 1pt for 10m",
            Metric.FEATURE_NULL_RATE_DELTA,
            0.01,
            600,
            100,
            None,
            Action.ROLLBACK,
            "features[7]",
        ),
        (
            "shadow_disagreement > 3% for 15m action alert-only",
            Metric.SHADOW_DISAGREEMENT,
            0.03,
            900,
            100,
            None,
            Action.ALERT_ONLY,
            "",
        ),
        ("error_rate>2% for 1h action pause", Metric.ERROR_RATE, 0.02, 3600, 100, None, Action.PAUSE, ""),
        ("timeout_rate > 1% for 5m", Metric.TIMEOUT_RATE, 0.01, 300, 100, None, Action.ROLLBACK, ""),
        ("value_drop > 3% p < 0.05 for 30m", Metric.VALUE_DROP, 0.03, 1800, 1000, 0.05, Action.ROLLBACK, ""),
        ("value_drop > 3% for 30m min 500", Metric.VALUE_DROP, 0.03, 1800, 500, 0.05, Action.ROLLBACK, ""),
        ("feature_drift[any] > 0.2 psi for 10m", Metric.FEATURE_DRIFT, 0.2, 600, 1000, None, Action.ROLLBACK, ""),
        ("feature_drift > 0.2psi for 10m", Metric.FEATURE_DRIFT, 0.2, 600, 1000, None, Action.ROLLBACK, ""),
        (
            "feature_drift[features[7]] > 0.1 ks for 10m",
            Metric.FEATURE_DRIFT,
            0.1,
            600,
            1000,
            None,
            Action.ROLLBACK,
            "features[7]",
        ),
        ("score_drift > 0.1 ks for 10m", Metric.SCORE_DRIFT, 0.1, 600, 1000, None, Action.ROLLBACK, ""),
        ("memory_growth > 200MB for 10m", Metric.MEMORY_GROWTH, 200.0, 600, 60, None, Action.ROLLBACK, ""),
        (
            "memory_growth > 1 GiB for 1h min 300",
            Metric.MEMORY_GROWTH,
            1073.741824,
            3600,
            300,
            None,
            Action.ROLLBACK,
            "",
        ),
    ],
)
def test_rules_read_as_written(text, metric, threshold, window, min_samples, alpha, action, feature) -> None:  # type: ignore[no-untyped-def]
    rule = parse_rule(text)
    assert (rule.metric, rule.window_seconds, rule.min_samples, rule.alpha, rule.action, rule.feature) == (
        metric, window, min_samples, alpha, action, feature,
    )  # fmt: skip
    assert rule.threshold == pytest.approx(threshold)
    assert rule.text == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("error_rate > 2%", "write METRIC > THRESHOLD for DURATION"),
        ("errors > 2% for 5m", "unknown metric 'errors'; metrics: error_rate, latency_p95_ratio"),
        ("error_rate > 2 for 5m", "error_rate takes a share: write 2%"),
        ("error_rate > 2% for 5 minutes", "'5' is not a duration"),
        ("error_rate > 2% for 5m min zero", "min 'zero': give a whole number"),
        ("error_rate > 2% for 5m action explode", "unknown action 'explode'; actions: rollback, pause, alert-only"),
        ("error_rate > 2% p < 0.05 for 5m", "only ctr_drop and value_drop take 'p < ALPHA'"),
        ("latency_p95_ratio > 30% for 5m", "is a ratio to stable"),
        ("error_rate[x] > 2% for 5m", "only feature_null_rate_delta and feature_drift take a [feature]"),
        ("ctr_drop > 5% p < 2 for 30m", "alpha 2.0 must be between 0 and 1"),
        ("error_rate > 2% for 5m sometimes", "'sometimes' needs a value"),
        ("feature_drift > 0.2 for 10m", "feature_drift names its statistic: write 0.2 psi or 0.2 ks"),
        ("score_drift > 20% for 10m", "score_drift names its statistic"),
        ("score_drift > 1.5 ks for 10m", "a KS distance is below 1; 1.5 ks can never breach"),
        ("memory_growth > 200 for 10m", "memory_growth is memory: write 200MB (or GB, MiB, GiB)"),
        ("timeout_rate > 0.01 for 5m", "timeout_rate takes a share: write 0.01%"),
        (
            "score_drift[features[1]] > 0.1 ks for 10m",
            "only feature_null_rate_delta and feature_drift take a [feature]",
        ),
    ],
)
def test_bad_rules_say_what_is_valid(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match="guardrail") as err:
        parse_rule(text)
    assert message in err.value.message


def test_rule_set_at_least() -> None:
    rules = RuleSet.parse(["error_rate > 2% for 5m", "latency_p95_ratio > 1.3 for 10m"], at_least=2)
    assert rules.at_least == 2 and rules.longest_window == 600
    with pytest.raises(InvalidInput, match="at_least: 3 must be between 1 and 2"):
        RuleSet.parse(["error_rate > 2% for 5m", "latency_p95_ratio > 1.3 for 10m"], at_least=3)


@pytest.mark.parametrize(
    ("text", "bare_seconds", "seconds"),
    [("30s", False, 30), ("5M", False, 300), (" 2h ", False, 7200), ("1d", False, 86400), ("90", True, 90)],
)
def test_one_duration_grammar_for_rules_and_the_cli(text: str, bare_seconds: bool, seconds: int) -> None:
    assert parse_duration(text, bare_seconds=bare_seconds) == seconds


@pytest.mark.parametrize("text", ["90", "0m", "5 minutes", "-5s", "5w"])
def test_durations_that_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="is not a duration; write 30s, 5m, 2h or 1d"):
        parse_duration(text)


def test_rule_windows_longer_than_the_history_are_refused() -> None:
    rules = RuleSet.parse(["error_rate > 2% for 5m", "latency_p95_ratio > 1.3 for 1h", "ctr_drop > 5% for 2h"])
    with pytest.raises(InvalidInput) as err:
        rules.check_history(1800)
    assert err.value.message == (
        "guardrail 'latency_p95_ratio > 1.3 for 1h' looks at 3600 s but the gateway keeps 1800 s of history; "
        "raise `gateway serve --window-history` or shorten the rule"
    )
    rules.check_history(3600)  # ctr_drop counts since its test began: its window is not cut


def test_a_window_cut_to_the_history_is_inconclusive_not_a_pass() -> None:
    clock = SimClock(1_000_000.0)
    window = SlidingWindow(1800, clock=clock)
    for _ in range(200):
        window.record(0.001, "INTERNAL")  # 50 minutes ago: inside the rule's hour, outside the history
    clock.now += 3000
    for _ in range(200):
        window.record(0.001, "OK")
    rule = parse_rule("error_rate > 2% for 1h min 100")
    verdict = evaluate(rule, "1.13", "1.12", window.stats(rule.window_seconds), None)
    assert verdict.status is Status.INCONCLUSIVE and "keeps 1800 s of history" in verdict.detail


def test_null_rate_without_nan_counters_is_inconclusive() -> None:
    clock = SimClock(1_000_000.0)
    canary, stable = SlidingWindow(600, clock=clock), SlidingWindow(600, clock=clock)
    for window in (canary, stable):
        for _ in range(200):
            window.record(0.001, "OK", rows=1)
    rule = parse_rule("feature_null_rate_delta > 1pt for 10m")
    verdict = evaluate(rule, "1.13", "1.12", canary.stats(600), stable.stats(600))
    assert verdict.status is Status.INCONCLUSIVE and math.isnan(verdict.observed)
    assert verdict.detail == "no NaN counts per feature in the window"


def test_every_metric_describes_itself_in_words() -> None:
    from gateway.guardrails.rules import Metric as M

    examples = {
        M.ERROR_RATE: (
            "error_rate > 2% for 5m min 500",
            ["server errors", "2%", "5 minutes", "500 requests of the candidate"],
        ),
        M.LATENCY_P95_RATIO: ("latency_p95_ratio > 1.3 for 10m", ["p95 latency", "1.3x stable's", "10 minutes"]),
        M.LATENCY_P99_RATIO: ("latency_p99_ratio > 2 for 30s", ["p99 latency", "30 seconds"]),
        M.LATENCY_P95_MS: ("latency_p95_ms > 50ms for 5m", ["above 50 ms"]),
        M.CTR_DROP: ("ctr_drop > 5% p < 0.05 for 30m", ["click-through rate", "5% below", "p < 0.05", "sequential"]),
        M.FEATURE_NULL_RATE_DELTA: (
            "feature_null_rate_delta[features[7]] > 1pt for 10m",
            ["feature features[7]", "1 points"],
        ),
        M.SHADOW_DISAGREEMENT: (
            "shadow_disagreement > 3% for 15m action alert-only",
            ["Record an incident", "disagree"],
        ),
        M.TIMEOUT_RATE: ("timeout_rate > 1% for 5m", ["time out", "cancelled", "1%"]),
        M.VALUE_DROP: ("value_drop > 3% p < 0.05 for 30m", ["value per request", "3% below", "1000 outcomes per arm"]),
        M.FEATURE_DRIFT: (
            "feature_drift[any] > 0.2 psi for 10m",
            ["worst one", "population stability index above 0.2"],
        ),
        M.SCORE_DRIFT: (
            "score_drift > 0.1 ks for 10m",
            ["output scores", "shadow", "Kolmogorov-Smirnov distance above 0.1"],
        ),
        M.MEMORY_GROWTH: ("memory_growth > 200MB for 10m", ["resident memory", "200 MB", "attribution by timing"]),
    }
    assert set(examples) == set(M)  # a new metric must say itself in words too
    for text, phrases in examples.values():
        words = parse_rule(text).describe()
        assert words.startswith(("Roll back to stable when", "Record an incident", "Pause"))
        for phrase in phrases:
            assert phrase in words, (text, phrase, words)
    rules = RuleSet.parse(["error_rate > 2% for 5m", "timeout_rate > 1% for 5m"], at_least=2, observe_only=True)
    lines = rules.describe()
    assert lines[0].startswith("error_rate > 2% for 5m: Roll back") and "at least 2 of these 2" in lines[2]
    assert "Observe-only" in lines[3]


def test_score_drift_checks_canaries_and_shadows() -> None:
    rules = RuleSet.parse(
        ["score_drift > 0.1 ks for 10m", "shadow_disagreement > 3% for 10m", "error_rate > 2% for 5m"]
    )
    assert [r.metric.value for r in rules.canary_rules] == ["score_drift", "error_rate"]
    assert [r.metric.value for r in rules.shadow_rules] == ["score_drift", "shadow_disagreement"]
    assert rules.uses(Metric.SCORE_DRIFT) and not rules.uses(Metric.FEATURE_DRIFT)


def test_sequential_rules_are_not_cut_by_the_history() -> None:
    RuleSet.parse(["value_drop > 3% for 2h"]).check_history(1800)
    with pytest.raises(InvalidInput):  # a window rule of the same length is
        RuleSet.parse(["error_rate > 2% for 2h"]).check_history(1800)
