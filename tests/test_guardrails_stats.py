"""The CTR rule keeps its false-rollback rate although the guardian checks it every tick, and has the
power asked for, measured through the guardian itself (testkit.simulation.ctr_rollouts: outcomes in
the sliding windows every simulated second, a guardian tick every second, the rule as written, a
rollback being the guardian moving the traffic to stable).

Figures reported (`pytest tests/test_guardrails_stats.py -s` prints them; benchmarks/guardrails.py
measures them at a production pace, beyond the 30-minute window): the A/A false-rollback rate and
the share of 5.0% -> 4.5% canaries rolled back by 60,000 outcomes per arm. The value-per-request test
(`value_drop`) is checked on the statistic alone below.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from gateway.guardrails.sequential import (
    CtrExperiment,
    Moments,
    SequentialDropTest,
    SequentialMeanDropTest,
    msprt_p_value,
)
from testkit.simulation import CtrSetup, ctr_rollouts


@pytest.mark.slow
def test_a_a_canaries_through_the_guardian_keep_the_false_rollback_rate() -> None:
    # A 1-minute rule and 1 minute of window history, so that each 200-second run outlives its window
    # three times over (the sliding windows wrap; the experiment must count from its start regardless).
    setup = CtrSetup(per_arm=20_000, per_second=100, rule="ctr_drop > 5% p < 0.05 for 1m", window_history=60)
    result = ctr_rollouts(0.05, runs=200, seed=11, setup=setup)
    print(f"\nA/A through the guardian: {result.rollback_rate:.1%} of {result.runs} canaries rolled back")
    assert result.runs == 200
    assert result.rollback_rate <= 0.05


@pytest.mark.slow
def test_a_ten_percent_ctr_drop_is_rolled_back_by_60k_per_arm_through_the_guardian() -> None:
    setup = CtrSetup(per_second=500)  # the rule as written; the guardian looks every 500 outcomes per arm
    result = ctr_rollouts(0.045, runs=100, seed=12, setup=setup)
    print(
        f"\n5.0% -> 4.5%: {result.rollback_rate:.1%} of {result.runs} canaries rolled back, median {result.median_at:.0f} per arm"
    )
    assert result.rollback_rate >= 0.90
    assert max(result.detected_at) <= setup.per_arm


def test_p_value_is_one_without_evidence_and_small_with_it() -> None:
    assert msprt_p_value(0, 1, 0, 1) == 1.0
    assert msprt_p_value(500, 10_000, 500, 10_000) == 1.0  # identical rates: no evidence
    assert msprt_p_value(300, 10_000, 500, 10_000) < 1e-4  # 3% vs 5%
    assert msprt_p_value(700, 10_000, 500, 10_000) == 1.0  # a rise is not a drop (one-sided)
    test = SequentialDropTest()
    first = test.update(300, 10_000, 500, 10_000).p_value
    assert test.update(1000, 20_000, 1000, 20_000).p_value == first  # weaker evidence later: never increases


class RunningTotals:
    """One arm's outcomes since it began, as a `SlidingWindow` keeps them beside its window."""

    def __init__(self) -> None:
        self.outcomes, self.clicks = 0, 0.0

    def outcome_totals(self) -> tuple[int, float]:
        return self.outcomes, self.clicks


def test_a_a_with_a_window_shorter_than_the_run_keeps_the_false_alarm_rate() -> None:
    runs, looks, per_look, window = 200, 200, 1000, 10  # the rule's window: 10 looks of 200
    rng = np.random.default_rng(21)
    fired = fired_on_windows = 0
    for _ in range(runs):
        canary, stable = RunningTotals(), RunningTotals()
        experiment = CtrExperiment(canary, stable)
        on_windows, recent = SequentialDropTest(), deque[tuple[int, int]](maxlen=window)
        alarmed = alarmed_on_windows = False
        for _ in range(looks):
            c, s = int(rng.binomial(per_look, 0.05)), int(rng.binomial(per_look, 0.05))
            canary.outcomes += per_look
            canary.clicks += c
            stable.outcomes += per_look
            stable.clicks += s
            result = experiment.update()
            alarmed = alarmed or (result.p_value < 0.05 and result.relative_drop > 0.05)
            recent.append((c, s))  # what feeding the test sliding-window counts would see
            n = len(recent) * per_look
            old = on_windows.update(sum(x for x, _ in recent), n, sum(y for _, y in recent), n)
            alarmed_on_windows = alarmed_on_windows or (old.p_value < 0.05 and old.relative_drop > 0.05)
        fired += alarmed
        fired_on_windows += alarmed_on_windows
    print(f"\nA/A, {looks} looks, window {window}: {fired / runs:.1%} (window counts: {fired_on_windows / runs:.1%})")
    assert fired / runs <= 0.05
    assert fired_on_windows > 2 * max(fired, 1)  # this setup is one where window counts would mislead


VALUE_RUNS, VALUE_LOOKS, VALUE_PER_LOOK = 200, 900, 40  # value per request: rollouts, looks, values per arm per look


def value_rollouts(drop: float, sigma: float, seed: int) -> tuple[float, float]:
    """Share of runs the value test rolls back (p < 0.05, drop > 3%, 1000 values per arm), and the median
    values per arm at detection. 12% of requests convert; a conversion's value is lognormal(3, sigma)."""
    rng = np.random.default_rng(seed)
    fired, when = 0, []
    for _ in range(VALUE_RUNS):
        arms = []
        for factor in (1 - drop, 1.0):
            values = (rng.random((VALUE_LOOKS, VALUE_PER_LOOK)) < 0.12) * rng.lognormal(
                3, sigma, (VALUE_LOOKS, VALUE_PER_LOOK)
            )
            values *= factor
            arms.append((np.cumsum(values.sum(axis=1)), np.cumsum((values**2).sum(axis=1))))
        test = SequentialMeanDropTest()
        for look in range(VALUE_LOOKS):
            n = (look + 1) * VALUE_PER_LOOK
            (c_sum, c_sq), (s_sum, s_sq) = arms
            result = test.update(Moments(n, c_sum[look], c_sq[look]), Moments(n, s_sum[look], s_sq[look]))
            if n >= 1000 and result.p_value < 0.05 and result.relative_drop > 0.03:
                fired += 1
                when.append(n)
                break
    return fired / VALUE_RUNS, float(np.median(when)) if when else float("nan")


@pytest.mark.slow
def test_value_per_request_a_a_keeps_the_false_alarm_rate_on_heavy_tails() -> None:
    for sigma, seed in ((0.5, 41), (1.5, 42)):
        rate, _ = value_rollouts(0.0, sigma, seed)
        print(f"\nvalue A/A, sigma {sigma}: {rate:.1%} of {VALUE_RUNS} rollouts rolled back ({VALUE_LOOKS} looks)")
        assert rate <= 0.05


def test_a_ten_percent_value_drop_is_detected() -> None:
    power, median = value_rollouts(0.10, 0.5, seed=43)
    print(f"\nvalue -10%: detected in {power:.1%} of {VALUE_RUNS} runs; median {median:.0f} values per arm")
    assert power >= 0.90
