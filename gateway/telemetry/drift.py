"""Input and score histograms per series, for the drift guardrails: fixed bins, bounded memory, mergeable counts.

Per endpoint the bins are fixed once: `FEATURE_BINS` per input feature and `SCORE_BINS` for
the score, at quantiles of a reference. The reference is a file named in the route file
(`drift_reference`: rows of the model's features, optionally with scores), or else the first
`warmup_rows` rows that stable serves once a drift rule asks for them. Then every weighted
request of the endpoint counts each row into its series' histograms: per feature the bin of
its value (one more bin for NaN), and the bin of its score (the first element of each row of
the model's first output). A shadow's series also counts its primary's scores on the same
mirrored requests (`paired`), so a shadow's score drift compares like with like.

No samples are kept after the warm-up, only counts: histograms from two windows or two
processes merge by adding them. Like the sliding windows, a series keeps running totals and a
snapshot of them at the start of each `SLOT_SECONDS`-second slot, so a window's histogram is
"totals now minus the snapshot at the window's first slot" (a window is resolved to
`SLOT_SECONDS`). Memory per series is fixed: at most `horizon / SLOT_SECONDS` snapshots of
`features x (FEATURE_BINS + 1) + 2 x (SCORE_BINS + 1)` 64-bit counters (32 features: 3.2 KB
a snapshot, 580 KB for 30 minutes). Endpoints without a drift rule cost one set lookup.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.guardrails.drift import quantile_edges

FEATURE_BINS = 10
SCORE_BINS = 20
SLOT_SECONDS = 10
#: Requests a series holds (by reference) before binning their rows together.
STAGE_REQUESTS = 64
WARMUP_ROWS = 1000
#: Bins are learnt from the rows this arm serves (the route table's `stable` label).
LEARN_FROM_ARM = "stable"
#: A model's float inputs with their widths (features per row), in the model's order.
FloatInputs = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class HistogramStats:
    """A series' histograms over a window: [features, FEATURE_BINS + 1] (the last bin NaN) and the scores'."""

    seconds: int
    features: np.ndarray
    scores: np.ndarray
    paired_scores: np.ndarray

    @property
    def rows(self) -> int:
        """Rows counted into the feature histograms."""
        return int(self.features[0].sum()) if len(self.features) else 0

    @property
    def scored(self) -> int:
        """Scores counted."""
        return int(self.scores.sum())

    @property
    def paired(self) -> int:
        """Primary scores counted on the same requests (shadows only)."""
        return int(self.paired_scores.sum())


class Histograms:
    """One version's running histogram totals and their per-slot snapshots. Thread-safe.

    The request path only keeps a reference to its (immutable) input and output arrays; they
    are binned `STAGE_REQUESTS` requests at a time (numpy's cost per call, not per row,
    dominates at batch 1), and always before a snapshot is taken or a window read, so every
    row lands in its own slot.
    """

    def __init__(
        self,
        horizon_seconds: int,
        edges: np.ndarray,
        score_edges: np.ndarray | None,
        clock: Callable[[], float],
    ) -> None:
        self.features = len(edges)
        # [FEATURE_BINS - 1, 1, features]: comparing rows [n, features] with it and summing over the
        # first axis adds whole rows at a time (summing over a short last axis is ~6x slower).
        self._edges = np.ascontiguousarray(edges.T)[:, None, :]
        self._edges32 = self._edges.astype(np.float32)  # float32 rows compare without widening to float64
        self._score_edges = score_edges
        self._clock = clock
        self._width = FEATURE_BINS + 1
        self._offsets = np.arange(self.features, dtype=np.intp) * self._width
        # One array for every counter: [features x width | scores | paired scores], one copy per snapshot.
        self._score_at = self.features * self._width
        self._paired_at = self._score_at + SCORE_BINS + 1
        self._totals = np.zeros(self._paired_at + SCORE_BINS + 1, dtype=np.int64)
        self._slots: list[tuple[int, np.ndarray | None]] = [(-1, None)] * (horizon_seconds // SLOT_SECONDS + 1)
        self._pending: list[tuple[FloatInputs, Mapping[str, np.ndarray], np.ndarray | None]] = []
        self._slot = -1
        self._lock = threading.Lock()

    def _tick(self) -> None:
        slot = int(self._clock()) // SLOT_SECONDS
        if slot != self._slot:
            self._flush()  # staged rows belong to the slot they arrived in
            self._slot = slot
            index = slot % len(self._slots)
            if self._slots[index][0] != slot:
                self._slots[index] = (slot, self._totals.copy())

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = _stack([rows_of(float_inputs, inputs) for float_inputs, inputs, _ in pending])
        self.count(rows)
        if self._score_edges is not None:
            scores = [score for _, _, score in pending if score is not None]
            stacked = _stack(scores) if len(scores) == len(pending) else None
            if stacked is not None and len(stacked) == len(rows):
                histogram = _score_histogram(stacked.reshape(len(rows), -1)[:, 0], self._score_edges)
                self._totals[self._score_at : self._paired_at] += histogram

    def count(self, rows: np.ndarray) -> None:
        """Bin rows [n, features] into the totals (callers hold the lock, or own the object alone)."""
        edges = self._edges32 if rows.dtype == np.float32 else self._edges
        bins = np.add.reduce(rows > edges, axis=0, dtype=np.intp)
        bins[np.isnan(rows)] = FEATURE_BINS
        bins += self._offsets
        self._totals[: self._score_at] += np.bincount(bins.ravel(), minlength=self._score_at)

    def add(self, float_inputs: FloatInputs, inputs: Mapping[str, np.ndarray], score: np.ndarray | None) -> None:
        """Count one request's rows (its float inputs) and scores (its first output, or None).

        `float_inputs` names the float inputs with their widths, in the model's order.
        """
        with self._lock:
            if int(self._clock()) // SLOT_SECONDS != self._slot:
                self._tick()
            self._pending.append((float_inputs, inputs, score))
            if len(self._pending) >= STAGE_REQUESTS:
                self._flush()

    def add_scores(self, scores: np.ndarray, paired: np.ndarray) -> None:
        """Count a shadow's scores and its primary's on the same rows (shadow workers: already batched)."""
        if self._score_edges is None:
            return
        with self._lock:
            self._tick()
            totals = self._totals
            totals[self._score_at : self._paired_at] += _score_histogram(scores, self._score_edges)
            totals[self._paired_at :] += _score_histogram(paired, self._score_edges)

    def window(self, seconds: int) -> HistogramStats:
        """The histograms over the last `seconds` (resolved to whole slots; this slot included)."""
        slots = min(max(1, math.ceil(seconds / SLOT_SECONDS)), len(self._slots) - 1)
        with self._lock:
            self._tick()
            self._flush()
            start = None
            for slot in range(self._slot - slots + 1, self._slot + 1):
                held, snapshot = self._slots[slot % len(self._slots)]
                if held == slot:
                    start = snapshot
                    break
            counts = self._totals - start if start is not None else np.zeros_like(self._totals)
        return HistogramStats(
            seconds=slots * SLOT_SECONDS,
            features=counts[: self._score_at].reshape(self.features, self._width),
            scores=counts[self._score_at : self._paired_at],
            paired_scores=counts[self._paired_at :],
        )


def rows_of(float_inputs: FloatInputs, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """A request's float inputs as rows [n, features], in the model's order."""
    if len(float_inputs) == 1:
        name, width = float_inputs[0]
        array = inputs[name]
        return array if array.ndim == 2 and array.shape[1] == width else array.reshape(-1, width)
    return np.concatenate([inputs[name].reshape(-1, width) for name, width in float_inputs], axis=1)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of one version's requests, one after the other along the batch axis."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _score_histogram(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    bins = np.searchsorted(edges, scores)
    bins[np.isnan(scores)] = SCORE_BINS
    return np.bincount(bins, minlength=SCORE_BINS + 1)


@dataclass(frozen=True)
class DriftBins:
    """An endpoint's bin edges: [features, FEATURE_BINS - 1] and [SCORE_BINS - 1], and where they came from."""

    features: np.ndarray | None
    scores: np.ndarray | None
    source: str

    @classmethod
    def from_sample(cls, rows: np.ndarray | None, scores: np.ndarray | None, source: str) -> DriftBins:
        """Edges at the quantiles of reference rows [n, features] and scores [n] (either may be absent)."""
        return cls(
            None if rows is None else quantile_edges(rows, FEATURE_BINS),
            None if scores is None else quantile_edges(scores.reshape(-1, 1), SCORE_BINS)[0],
            source,
        )


def load_reference(path: Path) -> DriftBins:
    """Bins from a reference file: a `.npy` of rows [rows, features], or a `.npz` with `features` (and `scores`).

    ValueError says what is wrong with the file.
    """
    scores = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                rows = archive["features"]
                scores = archive["scores"] if "scores" in archive.files else None
        else:
            rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"drift reference {path}: cannot read reference rows ({err})") from None
    if rows.ndim != 2 or rows.shape[0] < FEATURE_BINS or rows.dtype.kind not in "fiu":
        raise ValueError(
            f"drift reference {path}: expected numeric rows [rows >= {FEATURE_BINS}, features], got "
            f"{rows.dtype} {list(rows.shape)}"
        )
    return DriftBins.from_sample(
        rows, None if scores is None else np.asarray(scores, float).ravel(), f"reference {path}"
    )


class _Learner:
    """The first rows (and scores) stable serves, until there are enough to place the bins."""

    def __init__(self, features: int, rows: int) -> None:
        self.rows = np.empty((rows, features))
        self.scores = np.empty(rows)
        self.count = 0

    def add(self, matrix: np.ndarray, scores: np.ndarray | None) -> bool:
        take = min(len(matrix), len(self.rows) - self.count)
        self.rows[self.count : self.count + take] = matrix[:take]
        self.scores[self.count : self.count + take] = scores[:take] if scores is not None else np.nan
        self.count += take
        return self.count == len(self.rows)


class _Endpoint:
    """Drift state of one endpoint: its bins (or the learner placing them), its series, a problem to report."""

    def __init__(self, reference: DriftBins | None) -> None:
        self.features = reference.features if reference is not None else None
        self.scores = reference.scores if reference is not None else None
        self.source = reference.source if reference is not None else ""
        self.learner: _Learner | None = None
        self.problem = ""
        self.unusable = False  # its reference file failed: no bins, and none learnt in its place
        self.series: dict[str, Histograms] = {}


class DriftTracker:
    """Owns the drift bins of every endpoint with a drift rule and the histograms of its weighted series.

    The request path runs `observe` (one thread: the event loop); shadow workers run
    `observe_shadow`; the guardian reads `window` and sets what to `track`.
    """

    def __init__(
        self,
        horizon_seconds: int = 1800,
        *,
        clock: Callable[[], float] = time.time,
        warmup_rows: int = WARMUP_ROWS,
    ) -> None:
        self.horizon = horizon_seconds
        self._clock = clock
        self._warmup = warmup_rows
        self._endpoints: dict[str, _Endpoint] = {}
        self._references: dict[str, DriftBins | str] = {}
        self._lock = threading.Lock()

    # --- configuration --------------------------------------------------------------------------

    def track(self, endpoints: Iterable[str]) -> None:
        """Count histograms for these endpoints (those with a drift rule) and forget the others."""
        wanted = set(endpoints)
        if wanted == set(self._endpoints):
            return
        with self._lock:
            current = self._endpoints
            self._endpoints = {name: current[name] if name in current else self._fresh(name) for name in wanted}

    def set_references(self, references: Mapping[str, DriftBins | str]) -> None:
        """Bins from the route file's reference files by endpoint, or why a file could not be used.

        An endpoint left out learns its bins from stable's traffic; one whose file failed has none.
        """
        with self._lock:
            names = set(references) | set(self._references)
            changed = {n for n in names if references.get(n) is not self._references.get(n)}
            self._references = dict(references)
            self._endpoints = {
                name: self._fresh(name) if name in changed else state for name, state in self._endpoints.items()
            }

    def _fresh(self, endpoint: str) -> _Endpoint:
        reference = self._references.get(endpoint)
        if isinstance(reference, str):
            state = _Endpoint(None)
            state.problem, state.unusable = reference, True
            return state
        return _Endpoint(reference)

    # --- the request path -----------------------------------------------------------------------

    def observe(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        endpoint: str,
        version: str,
        arm: str,
        float_inputs: FloatInputs,
        inputs: Mapping[str, np.ndarray],
        score: np.ndarray | None,
    ) -> None:
        """Count one weighted request's rows (its float inputs, in the model's order) and scores.

        The arrays are kept by reference until they are binned: they must not change afterwards
        (request inputs and model outputs never do).
        """
        state = self._endpoints.get(endpoint)
        if state is None or state.unusable:
            return
        if arm == LEARN_FROM_ARM and (state.features is None or (state.scores is None and score is not None)):
            self._learn(version, state, float_inputs, inputs, score)
        histograms = state.series.get(version) or self._histograms(endpoint, version, state, float_inputs)
        if histograms is not None:
            histograms.add(float_inputs, inputs, score)

    def _learn(
        self,
        version: str,
        state: _Endpoint,
        float_inputs: FloatInputs,
        inputs: Mapping[str, np.ndarray],
        score: np.ndarray | None,
    ) -> None:
        rows = rows_of(float_inputs, inputs)
        scores = score.reshape(len(rows), -1)[:, 0] if score is not None and score.size >= len(rows) else None
        with self._lock:  # only during the warm-up: requests may run on several threads
            self._learn_locked(version, state, rows, scores)

    def _learn_locked(self, version: str, state: _Endpoint, rows: np.ndarray, scores: np.ndarray | None) -> None:
        if state.learner is None:
            state.learner = _Learner(rows.shape[1], self._warmup)
        if rows.shape[1] != state.learner.rows.shape[1] or not state.learner.add(rows, scores):
            return
        learner, state.learner = state.learner, None
        source = f"learnt from the first {len(learner.rows)} rows stable ({version}) served"
        if state.features is None:
            state.features = quantile_edges(learner.rows, FEATURE_BINS)
            state.source = source
        if state.scores is None and not np.isnan(learner.scores).all():
            state.scores = quantile_edges(learner.scores.reshape(-1, 1), SCORE_BINS)[0]
            state.source = source if state.source == source else f"{state.source}; scores {source}"
        state.series = {}  # histograms start afresh with every bin in place

    def observe_shadow(self, endpoint: str, version: str, shadow: np.ndarray, primary: np.ndarray) -> None:
        """Count a shadow's scores and its primary's on the same mirrored rows (shadow worker threads)."""
        state = self._endpoints.get(endpoint)
        rows = min(len(shadow), len(primary))
        if state is None or state.features is None or not rows:
            return
        histograms = state.series.get(version) or self._histograms(endpoint, version, state, ())
        if histograms is not None:
            histograms.add_scores(shadow.reshape(rows, -1)[:, 0], primary.reshape(rows, -1)[:, 0])

    def _histograms(
        self, endpoint: str, version: str, state: _Endpoint, float_inputs: FloatInputs
    ) -> Histograms | None:
        if state.features is None:
            return None
        features = sum(width for _, width in float_inputs)
        if float_inputs and features != len(state.features):
            state.problem = (
                f"{endpoint} {version} has {features} input features but the drift bins have "
                f"{len(state.features)} ({state.source})"
            )
            return None
        with self._lock:
            histograms = state.series.get(version)
            if histograms is None:
                histograms = Histograms(self.horizon, state.features, state.scores, self._clock)
                state.series = {**state.series, version: histograms}
        return histograms

    # --- reading (the guardian) -----------------------------------------------------------------

    def window(self, endpoint: str, version: str, seconds: int) -> HistogramStats | None:
        """A version's histograms over the last `seconds` (None when none are counted)."""
        state = self._endpoints.get(endpoint)
        histograms = state.series.get(version) if state is not None else None
        return histograms.window(seconds) if histograms is not None else None

    def status(self, endpoint: str) -> str:
        """Why an endpoint has no histograms to compare yet ("" when its bins are placed and fit)."""
        state = self._endpoints.get(endpoint)
        if state is None:
            return "no drift rule asked for histograms yet (they start at the next guardian tick)"
        if state.problem:
            return state.problem
        if state.features is None:
            seen = state.learner.count if state.learner is not None else 0
            return f"placing the bins: {seen} of {self._warmup} rows served by stable seen so far"
        return ""

    def source(self, endpoint: str) -> str:
        """Where an endpoint's bins came from."""
        state = self._endpoints.get(endpoint)
        return state.source if state is not None else ""
