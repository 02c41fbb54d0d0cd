"""The CTR test keeps its false-alarm rate although it is checked every tick, and has the power asked for.

Figures reported (`pytest tests/test_guardrails_stats.py -s` prints them):
A/A false-rollback rate and detection power of a 5.0% -> 4.5% CTR drop by 60,000 requests per arm.
"""

from __future__ import annotations

import numpy as np

from gateway.guardrails.sequential import SequentialDropTest, msprt_p_value

RUNS = 200
PER_ARM = 60_000
PER_TICK = 500  # outcomes per arm between two looks (120 looks per run)


def rollouts(canary_ctr: float, seed: int) -> tuple[float, float]:
    """Share of runs that roll back (p < 0.05 and drop > 5%), and the median requests per arm at detection."""
    rng = np.random.default_rng(seed)
    fired, when = 0, []
    for _ in range(RUNS):
        test = SequentialDropTest()
        canary = stable = n = 0
        while n < PER_ARM:
            canary += rng.binomial(PER_TICK, canary_ctr)
            stable += rng.binomial(PER_TICK, 0.05)
            n += PER_TICK
            result = test.update(canary, n, stable, n)
            if result.p_value < 0.05 and result.relative_drop > 0.05:
                fired += 1
                when.append(n)
                break
    return fired / RUNS, float(np.median(when)) if when else float("nan")


def test_a_a_rollouts_keep_the_false_alarm_rate() -> None:
    rate, _ = rollouts(0.05, seed=11)
    print(f"\nA/A: {rate:.1%} of {RUNS} rollouts rolled back (checked every {PER_TICK} outcomes per arm)")
    assert rate <= 0.05


def test_a_ten_percent_drop_is_detected_by_60k_per_arm() -> None:
    power, median = rollouts(0.045, seed=12)
    print(f"\n5.0% -> 4.5%: detected in {power:.1%} of {RUNS} runs; median {median:.0f} requests per arm")
    assert power >= 0.90


def test_p_value_is_one_without_evidence_and_small_with_it() -> None:
    assert msprt_p_value(0, 1, 0, 1) == 1.0
    assert msprt_p_value(500, 10_000, 500, 10_000) == 1.0  # identical rates: no evidence
    assert msprt_p_value(300, 10_000, 500, 10_000) < 1e-4  # 3% vs 5%
    assert msprt_p_value(700, 10_000, 500, 10_000) == 1.0  # a rise is not a drop (one-sided)
    test = SequentialDropTest()
    first = test.update(300, 10_000, 500, 10_000).p_value
    assert test.update(1000, 20_000, 1000, 20_000).p_value == first  # weaker evidence later: never increases
