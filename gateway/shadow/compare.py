"""Compare a shadow's outputs with the primary's, tensor by tensor.

For every output: max and mean absolute difference, the largest relative difference, and
decision agreement per row: for scores (one value per row) whether both sides fall on the
same side of a threshold; for class scores (several per row) whether the argmax is the
same; with `top_k`, the mean overlap of the top-k classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_EPSILON = 1e-12


@dataclass(frozen=True)
class CompareSettings:
    """How decisions are read from outputs."""

    threshold: float = 0.5
    top_k: int = 0


@dataclass(frozen=True)
class TensorDiff:
    """The difference between the primary's and the shadow's value of one output."""

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    rows: int
    agree: int
    top_k_overlap: float | None = None
    shape_mismatch: bool = False

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        body: dict[str, object] = {
            "name": self.name,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "max_rel": self.max_rel,
            "rows": self.rows,
            "agree": self.agree,
        }
        if self.top_k_overlap is not None:
            body["top_k_overlap"] = self.top_k_overlap
        if self.shape_mismatch:
            body["shape_mismatch"] = True
        return body


def _rows(array: np.ndarray) -> np.ndarray:
    """View as [rows, values per row] (a scalar or 1-D array is one value per row)."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(array.shape[0], -1)


def compare_tensor(
    name: str, primary: np.ndarray, shadow: np.ndarray, settings: CompareSettings
) -> TensorDiff:
    """Differences and decision agreement for one output."""
    if primary.shape != shadow.shape:
        rows = _rows(primary).shape[0]
        return TensorDiff(name, float("inf"), float("inf"), float("inf"), rows, 0, None, shape_mismatch=True)
    p = _rows(primary.astype(np.float64, copy=False))
    s = _rows(shadow.astype(np.float64, copy=False))
    if p.size == 0:
        return TensorDiff(name, 0.0, 0.0, 0.0, p.shape[0], p.shape[0])
    diff = np.abs(p - s)
    relative = diff / np.maximum(np.abs(p), _EPSILON)
    if p.shape[1] == 1:
        agree = int(np.count_nonzero((p[:, 0] >= settings.threshold) == (s[:, 0] >= settings.threshold)))
    else:
        agree = int(np.count_nonzero(np.argmax(p, axis=1) == np.argmax(s, axis=1)))
    overlap = None
    if settings.top_k and p.shape[1] > 1:
        k = min(settings.top_k, p.shape[1])
        top_p = np.argsort(-p, axis=1)[:, :k]
        top_s = np.argsort(-s, axis=1)[:, :k]
        overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_p, top_s, strict=True)]))
    return TensorDiff(
        name=name,
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_rel=float(relative.max()),
        rows=p.shape[0],
        agree=agree,
        top_k_overlap=overlap,
    )


def compare_outputs(
    primary: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray], settings: CompareSettings
) -> list[TensorDiff]:
    """Every output the primary returned, compared with the shadow's (missing = shape mismatch)."""
    diffs = []
    for name, value in primary.items():
        other = shadow.get(name)
        if other is None:
            rows = _rows(value).shape[0]
            diffs.append(
                TensorDiff(name, float("inf"), float("inf"), float("inf"), rows, 0, None, shape_mismatch=True)
            )
        else:
            diffs.append(compare_tensor(name, value, other, settings))
    return diffs
