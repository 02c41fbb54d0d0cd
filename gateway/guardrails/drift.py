"""Distances between two distributions kept as fixed-bin histograms (pure, no I/O).

The gateway never keeps samples for drift: each series counts its rows into bins fixed per
endpoint (quantiles of a reference: stable's warm-up traffic or a reference file), so two
series' histograms compare bin by bin, and histograms from many windows or processes merge
by adding counts.

- Population stability index: PSI = sum_i (a_i - e_i) ln(a_i / e_i) over the bins' shares,
  e the baseline's (stable, or a shadow's primary) and a the candidate's. Shares are
  smoothed (half a count per bin) so an empty bin does not make it infinite; bins empty in
  both histograms are left out. Rules of thumb: < 0.1 stable, 0.1-0.25 a shift, > 0.25 a
  large one. On two samples of n from one distribution it is about (k - 1) (1/n_a + 1/n_e)
  for k bins: 0.018 for 1000 rows per arm and 10 bins, which is why drift rules want at
  least 1000 rows per arm by default.
- Kolmogorov-Smirnov distance: the largest gap between the two cumulative shares at a bin
  edge (missing values left out). With bins at quantiles of the baseline it is at most the
  true two-sample statistic and within one bin's share of it.
"""

from __future__ import annotations

import math

import numpy as np

#: Half a count per bin: PSI stays finite when a bin is empty in one histogram.
SMOOTHING = 0.5


def quantile_edges(sample: np.ndarray, bins: int) -> np.ndarray:
    """Interior bin edges at the 1/bins .. (bins-1)/bins quantiles of each column (NaNs ignored).

    `sample` is [rows, columns]; the result is [columns, bins - 1], nondecreasing along each row.
    A column with no finite value gets edges at 0. Repeated edges (a discrete feature) only
    leave some bins empty in every histogram, which the distances ignore.
    """
    data = np.asarray(sample, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    data = np.where(np.isfinite(data), data, np.nan)
    qs = np.arange(1, bins) / bins
    edges = np.zeros((data.shape[1], bins - 1))
    for column in range(data.shape[1]):
        values = data[:, column]
        values = values[~np.isnan(values)]
        if values.size:
            edges[column] = np.quantile(values, qs)
    return edges


def psi(baseline: np.ndarray, candidate: np.ndarray) -> float:
    """Population stability index of `candidate` against `baseline` (counts per bin; NaN if either is empty)."""
    e, a = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    used = (e > 0) | (a > 0)
    e, a = e[used], a[used]
    if not e.sum() or not a.sum():
        return math.nan
    k = len(e)
    e_share = (e + SMOOTHING) / (e.sum() + SMOOTHING * k)
    a_share = (a + SMOOTHING) / (a.sum() + SMOOTHING * k)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def ks(baseline: np.ndarray, candidate: np.ndarray) -> float:
    """Largest gap between the two cumulative shares at the bin edges (NaN if either is empty)."""
    e, a = np.asarray(baseline, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if not e.sum() or not a.sum():
        return math.nan
    return float(np.max(np.abs(np.cumsum(e) / e.sum() - np.cumsum(a) / a.sum())))
