from __future__ import annotations

import math

import pytest

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
        ("error_rate > 2% p < 0.05 for 5m", "only ctr_drop takes 'p < ALPHA'"),
        ("latency_p95_ratio > 30% for 5m", "is a ratio to stable"),
        ("error_rate[x] > 2% for 5m", "only feature_null_rate_delta takes a [feature]"),
        ("ctr_drop > 5% p < 2 for 30m", "alpha 2.0 must be between 0 and 1"),
        ("error_rate > 2% for 5m sometimes", "'sometimes' needs a value"),
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


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_cut_to_the_history_is_inconclusive_not_a_pass() -> None:
    clock = Clock()
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
    clock = Clock()
    canary, stable = SlidingWindow(600, clock=clock), SlidingWindow(600, clock=clock)
    for window in (canary, stable):
        for _ in range(200):
            window.record(0.001, "OK", rows=1)
    rule = parse_rule("feature_null_rate_delta > 1pt for 10m")
    verdict = evaluate(rule, "1.13", "1.12", canary.stats(600), stable.stats(600))
    assert verdict.status is Status.INCONCLUSIVE and math.isnan(verdict.observed)
    assert verdict.detail == "no NaN counts per feature in the window"
