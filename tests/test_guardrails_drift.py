"""Histogram distances for the drift rules and the sequential test on means: pure statistics."""

from __future__ import annotations

import math

import numpy as np

from gateway.guardrails.drift import ks, psi, quantile_edges
from gateway.guardrails.sequential import Moments, SequentialMeanDropTest, mean_msprt_p_value


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def test_quantile_edges_split_a_sample_into_equal_shares() -> None:
    rng = np.random.default_rng(1)
    sample = np.column_stack([rng.normal(size=10_000), rng.exponential(size=10_000), np.zeros(10_000)])
    sample[::10, 0] = np.nan  # missing values do not move the edges
    edges = quantile_edges(sample, 10)
    assert edges.shape == (3, 9) and np.all(np.diff(edges, axis=1) >= 0)
    counts = histogram(sample[~np.isnan(sample[:, 0]), 0], edges[0])
    assert counts.min() >= 850 and counts.max() <= 950  # ~900 each
    assert np.all(edges[2] == 0)  # a constant feature: repeated edges, empty bins
    assert np.all(quantile_edges(np.full((5, 1), np.nan), 4) == 0)


def test_psi_is_zero_for_equal_shares_small_for_noise_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(2)
    edges = quantile_edges(rng.normal(size=(5000, 1)), 10)[0]
    same = [psi(histogram(rng.normal(size=1000), edges), histogram(rng.normal(size=1000), edges)) for _ in range(200)]
    assert psi(np.array([10, 20, 30]), np.array([20, 40, 60])) < 1e-3  # equal shares (up to smoothing)
    # Two samples of 1000 from one distribution: about (k - 1) (2 / n) = 0.018 for k = 10 bins.
    assert 0.012 < float(np.mean(same)) < 0.025 and max(same) < 0.06
    shifted = psi(histogram(rng.normal(size=5000), edges), histogram(rng.normal(0.5, 1, size=5000), edges))
    assert shifted > 0.2
    unit_change = psi(histogram(rng.normal(size=5000), edges), histogram(rng.normal(size=5000) * 100, edges))
    assert unit_change > 2
    assert psi(np.array([0, 5, 5]), np.array([10, 0, 0])) > 1 and math.isfinite(psi(np.array([0, 5]), np.array([5, 0])))
    assert math.isnan(psi(np.zeros(3), np.ones(3)))


def test_binned_ks_is_close_to_the_two_sample_statistic() -> None:
    rng = np.random.default_rng(3)
    stable, canary = rng.normal(size=20_000), rng.normal(0.3, 1, size=20_000)
    edges = quantile_edges(stable[:, None], 20)[0]
    binned = ks(histogram(stable, edges), histogram(canary, edges))
    grid = np.sort(np.concatenate([stable, canary]))
    exact = float(np.max(np.abs(np.searchsorted(np.sort(stable), grid, side="right") / stable.size
                                - np.searchsorted(np.sort(canary), grid, side="right") / canary.size)))  # fmt: skip
    assert binned <= exact + 1e-9 and exact - binned < 0.05  # within one bin's share (5%)
    assert ks(np.array([5, 5]), np.array([5, 5])) == 0.0 and math.isnan(ks(np.zeros(2), np.ones(2)))


def test_moments_give_the_mean_and_the_sample_variance_and_subtract() -> None:
    values = np.array([1.0, 2.0, 4.0, 8.0])
    m = Moments(4, float(values.sum()), float((values**2).sum()))
    assert m.mean == values.mean() and abs(m.variance - values.var(ddof=1)) < 1e-12
    assert (m - Moments(1, 1.0, 1.0)) == Moments(3, 14.0, 84.0)
    assert math.isnan(Moments().mean) and Moments(1, 2.0, 4.0).variance == 0.0


def test_mean_test_sees_a_drop_not_a_rise_and_never_raises_its_p_value() -> None:
    rng = np.random.default_rng(4)

    def moments(values: np.ndarray) -> Moments:
        return Moments(values.size, float(values.sum()), float((values**2).sum()))

    stable = rng.lognormal(1, 1, size=20_000)
    assert mean_msprt_p_value(moments(stable * 0.8), moments(stable)) < 1e-4
    assert mean_msprt_p_value(moments(stable * 1.2), moments(stable)) == 1.0  # one-sided
    assert mean_msprt_p_value(Moments(1, 1.0, 1.0), moments(stable)) == 1.0
    test = SequentialMeanDropTest()
    first = test.update(moments(stable * 0.8), moments(stable))
    assert first.relative_drop > 0.19 and first.canary_n == 20_000
    assert test.update(moments(stable), moments(stable)).p_value == first.p_value
