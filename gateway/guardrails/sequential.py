"""Always-valid tests for a drop in a rate (CTR) or a mean (value per request), safe to check at every tick.

Checking a fixed-sample p-value every second inflates false alarms far above alpha. This is
the mixture sequential probability ratio test (mSPRT) of Johari, Pekelis and Walsh ("Always
valid inference", 2017) for the difference d = p_canary - p_stable of two click rates, under
the normal approximation, one-sided: the mixing distribution over the effect is a normal
N(0, tau^2) restricted to drops (effect < 0), which doubles the evidence a real drop builds:

    V      = p (1 - p) (1/n_c + 1/n_s)                  (variance of d under no difference)
    Lambda = 2 sqrt(V / (V + tau^2)) exp(tau^2 d^2 / (2 V (V + tau^2))) Phi(-d tau / sqrt(V (V + tau^2)))
    p      = min(p_previous, 1 / Lambda)                (always-valid p-value)

Lambda is a nonnegative martingale with mean 1 when the rates are equal, so for every
stopping rule P(p ever falls below alpha) <= alpha: the guardian may look every tick.
`tau` is the scale of drops worth detecting; the default (relative to the pooled rate)
suits drops of about 10%. Measured: tests/test_guardrails_stats.py.

The same test on a mean (`value_drop`: revenue or watch time per request): d is the difference
of the two arms' mean values and V = s_c^2 / n_c + s_s^2 / n_s (Welch's variance, from each
arm's count, sum and sum of squares, so the inputs stay mergeable counts); tau is
TAU_RELATIVE of the pooled mean. With the variance estimated rather than known the guarantee
is asymptotic; `min N` keeps the first looks away from small samples (default 1000 values per
arm), and the false-alarm rate is measured through the guardian on heavy-tailed values
(benchmarks/guardrails.py, tests/test_guardrails_stats.py).

The guarantee needs counts that accumulate from the test's start. Sliding-window counts forget,
so the running minimum would get a fresh chance to dip every window (an A/A false-alarm rate of
30% instead of 3% in the measurement): `CtrExperiment` feeds the test the outcomes since it began.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

#: Effects are sized relative to the stable rate: tau = TAU_RELATIVE * p_stable.
TAU_RELATIVE = 0.1


@dataclass(frozen=True)
class RateTest:
    """One evaluation: the arms' rates (or means), the relative drop and the always-valid p-value."""

    canary_rate: float
    stable_rate: float
    relative_drop: float
    p_value: float
    canary_n: int
    stable_n: int


def _one_sided_msprt(diff: float, variance: float, tau: float) -> float:
    """1 / Lambda for an observed difference with known variance, mixing over drops only."""
    tau2 = tau * tau
    spread = math.sqrt(variance * (variance + tau2))
    one_sided = 0.5 * math.erfc(diff * tau / spread / math.sqrt(2))  # Phi(-d tau / spread)
    if one_sided <= 0:
        return 1.0
    log_lambda = (
        math.log(2 * one_sided)
        + 0.5 * math.log(variance / (variance + tau2))
        + tau2 * diff * diff / (2 * variance * (variance + tau2))
    )
    return 1.0 if log_lambda <= 0 else math.exp(-log_lambda)


def msprt_p_value(
    canary_clicks: float, canary_n: int, stable_clicks: float, stable_n: int, tau: float | None = None
) -> float:
    """1 / Lambda for the current counts (take the running minimum for an always-valid p-value)."""
    if canary_n < 2 or stable_n < 2:
        return 1.0
    p_c, p_s = canary_clicks / canary_n, stable_clicks / stable_n
    pooled = (canary_clicks + stable_clicks) / (canary_n + stable_n)
    variance = pooled * (1 - pooled) * (1 / canary_n + 1 / stable_n)
    if variance <= 0:
        return 1.0
    return _one_sided_msprt(p_c - p_s, variance, tau if tau is not None else max(TAU_RELATIVE * pooled, 1e-6))


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of some values: a mean and its variance, mergeable by adding."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.n - other.n, self.total - other.total, self.squares - other.squares)

    @property
    def mean(self) -> float:
        """The mean (NaN without values)."""
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """The sample variance (0 with fewer than two values; never negative)."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


def mean_msprt_p_value(canary: Moments, stable: Moments, tau: float | None = None) -> float:
    """1 / Lambda for a drop of the canary's mean below stable's (take the running minimum)."""
    if canary.n < 2 or stable.n < 2:
        return 1.0
    variance = canary.variance / canary.n + stable.variance / stable.n
    if variance <= 0:
        return 1.0
    pooled = (canary.total + stable.total) / (canary.n + stable.n)
    scale = tau if tau is not None else TAU_RELATIVE * abs(pooled)
    return _one_sided_msprt(canary.mean - stable.mean, variance, max(scale, 1e-12))


class SequentialDropTest:
    """Running state of one canary-vs-stable comparison: the always-valid p-value so far."""

    def __init__(self, tau: float | None = None) -> None:
        self.tau = tau
        self.p_value = 1.0

    def update(self, canary_clicks: float, canary_n: int, stable_clicks: float, stable_n: int) -> RateTest:
        """Fold in the current cumulative counts; the p-value never increases."""
        p = msprt_p_value(canary_clicks, canary_n, stable_clicks, stable_n, self.tau)
        self.p_value = min(self.p_value, p)
        canary_rate = canary_clicks / canary_n if canary_n else math.nan
        stable_rate = stable_clicks / stable_n if stable_n else math.nan
        drop = (stable_rate - canary_rate) / stable_rate if stable_n and stable_rate > 0 else math.nan
        return RateTest(canary_rate, stable_rate, drop, self.p_value, canary_n, stable_n)


class SequentialMeanDropTest:
    """Running state of one canary-vs-stable comparison of means: the always-valid p-value so far."""

    def __init__(self, tau: float | None = None) -> None:
        self.tau = tau
        self.p_value = 1.0

    def update(self, canary: Moments, stable: Moments) -> RateTest:
        """Fold in the current cumulative moments; the p-value never increases."""
        self.p_value = min(self.p_value, mean_msprt_p_value(canary, stable, self.tau))
        c, s = canary.mean, stable.mean
        drop = (s - c) / s if stable.n and s > 0 else math.nan
        return RateTest(c, s, drop, self.p_value, canary.n, stable.n)


class OutcomeSeries(Protocol):
    """A series with running outcome totals (a `SlidingWindow`)."""

    def outcome_totals(self) -> tuple[int, float]:
        """(outcomes, their sum) since the series began."""
        ...


class CtrExperiment:
    """A canary-vs-stable CTR comparison from its creation on.

    One sequential test, fed each arm's outcomes since then: the running totals now minus those
    at the start.
    """

    def __init__(self, canary: OutcomeSeries, stable: OutcomeSeries, tau: float | None = None) -> None:
        self._canary, self._stable = canary, stable
        self._start = canary.outcome_totals(), stable.outcome_totals()
        self._test = SequentialDropTest(tau)

    def update(self) -> RateTest:
        """Look once more: the test on the outcomes since the experiment began."""
        (canary_n0, canary_sum0), (stable_n0, stable_sum0) = self._start
        canary_n, canary_sum = self._canary.outcome_totals()
        stable_n, stable_sum = self._stable.outcome_totals()
        return self._test.update(
            canary_sum - canary_sum0, canary_n - canary_n0, stable_sum - stable_sum0, stable_n - stable_n0
        )


class ValueSeries(Protocol):
    """A series with running totals of business values (a `SlidingWindow`)."""

    def value_totals(self) -> Moments:
        """Count, sum and sum of squares of the values since the series began."""
        ...


class ValueExperiment:
    """A canary-vs-stable comparison of value per request from its creation on (like `CtrExperiment`)."""

    def __init__(self, canary: ValueSeries, stable: ValueSeries, tau: float | None = None) -> None:
        self._canary, self._stable = canary, stable
        self._start = canary.value_totals(), stable.value_totals()
        self._test = SequentialMeanDropTest(tau)

    def update(self) -> RateTest:
        """Look once more: the test on the values since the experiment began."""
        return self._test.update(
            self._canary.value_totals() - self._start[0], self._stable.value_totals() - self._start[1]
        )
