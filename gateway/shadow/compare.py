"""Compare a shadow's outputs with the primary's, output by output, for a batch of requests.

For every output of every request: max and mean absolute difference, the largest relative
difference, and decision agreement per row: for scores (one value per row) whether both
sides fall on the same side of a threshold; for class scores (several per row) whether the
argmax is the same; with `top_k`, the mean overlap of the top-k classes. The work is
vectorised over the whole batch and split per request with `reduceat`. A NaN on one side
only is an infinite difference (like a shape mismatch); NaN on both sides is no difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.config import ShadowCompareConfig

_EPSILON = 1e-12


@dataclass(frozen=True)
class RequestDiff:
    """One request's comparison: the largest figures over its outputs, and each output's."""

    max_abs: float
    mean_abs: float
    max_rel: float
    rows: int
    agree: int
    outputs: list[dict[str, Any]]


def _rows(array: np.ndarray) -> np.ndarray:
    """View as [rows, values per row] (a scalar or 1-D array is one value per row)."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(array.shape[0], -1)


def _top_k_overlap(p: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of the primary's top-k classes that are also in the shadow's."""
    k = min(k, p.shape[1])
    top_p = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top_s = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(top_p, top_s, strict=True)])


def _compare_output(
    value: np.ndarray,
    other: np.ndarray | None,
    starts: np.ndarray,
    rows: np.ndarray,
    settings: ShadowCompareConfig,
) -> dict[str, np.ndarray] | None:
    """Per-request arrays for one output (None when the shapes do not match)."""
    p = _rows(value.astype(np.float64, copy=False))
    if other is None or other.shape != value.shape or p.shape[0] != int(rows.sum()) or p.size == 0:
        return None
    s = _rows(other.astype(np.float64, copy=False))
    with np.errstate(invalid="ignore"):
        diff = np.abs(p - s)
    if p.shape[1] == 1:
        agree_rows = (p[:, 0] >= settings.threshold) == (s[:, 0] >= settings.threshold)
    else:
        agree_rows = np.argmax(p, axis=1) == np.argmax(s, axis=1)
    if np.isfinite(diff).all():
        relative = diff / np.maximum(np.abs(p), _EPSILON)
    else:
        diff, relative = _non_finite(p, s, diff, agree_rows)
    result = {
        "max_abs": np.maximum.reduceat(diff.max(axis=1), starts),
        "mean_abs": np.add.reduceat(diff.sum(axis=1), starts) / (rows * p.shape[1]),
        "max_rel": np.maximum.reduceat(relative.max(axis=1), starts),
        "agree": np.add.reduceat(agree_rows.astype(np.int64), starts),
    }
    if settings.top_k and p.shape[1] > 1:
        result["top_k_overlap"] = np.add.reduceat(_top_k_overlap(p, s, settings.top_k), starts) / rows
    return result


def _non_finite(
    p: np.ndarray, s: np.ndarray, diff: np.ndarray, agree_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Differences where a side is NaN or infinite, so that no NaN reaches the reports.

    NaN on one side only is the largest difference (+inf, as a shape mismatch) and a
    disagreement. NaN on both sides, or the same infinity, is no difference: both versions gave
    the same answer (usually to a NaN input).
    """
    p_nan, s_nan = np.isnan(p), np.isnan(s)
    diff[np.isnan(diff)] = np.inf
    diff[(p_nan & s_nan) | (p == s)] = 0.0
    agree_rows &= ~(p_nan != s_nan).any(axis=1)
    with np.errstate(invalid="ignore"):
        relative = np.where(np.isinf(diff), np.inf, diff / np.fmax(np.abs(p), _EPSILON))
    return diff, relative


def compare_batch(
    primary: Mapping[str, np.ndarray],
    shadow: Mapping[str, np.ndarray],
    row_counts: Sequence[int],
    settings: ShadowCompareConfig,
) -> list[RequestDiff]:
    """Compare several requests run as one batch (their rows concatenated in order)."""
    rows = np.asarray(row_counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.intp)
    per_output = {
        name: _compare_output(value, shadow.get(name), starts, rows, settings) for name, value in primary.items()
    }
    results = []
    for j, count in enumerate(row_counts):
        outputs: list[dict[str, Any]] = []
        for name, figures in per_output.items():
            if figures is None:
                outputs.append(
                    {"name": name, "max_abs": np.inf, "mean_abs": np.inf, "max_rel": np.inf, "rows": count,
                     "agree": 0, "shape_mismatch": True}
                )  # fmt: skip
                continue
            entry: dict[str, Any] = {"name": name, "rows": count}
            entry.update({key: (int(v[j]) if key == "agree" else float(v[j])) for key, v in figures.items()})
            outputs.append(entry)
        results.append(
            RequestDiff(
                max_abs=max((o["max_abs"] for o in outputs), default=0.0),
                mean_abs=max((o["mean_abs"] for o in outputs), default=0.0),
                max_rel=max((o["max_rel"] for o in outputs), default=0.0),
                rows=count * len(outputs),
                agree=sum(o["agree"] for o in outputs),
                outputs=outputs,
            )
        )
    return results


def compare_outputs(
    primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], settings: ShadowCompareConfig
) -> RequestDiff:
    """One request's comparison."""
    first = next(iter(primary.values()), np.zeros((0,)))
    return compare_batch(primary, shadow, [int(_rows(first).shape[0])], settings)[0]
