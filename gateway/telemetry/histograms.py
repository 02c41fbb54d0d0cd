"""One series' input and score histograms on fixed bins: running totals, per-slot snapshots, mergeable counts.

A series (an endpoint's version) counts each row into its histograms: per feature the bin of
its value (one more bin for NaN), and the bin of its score (the first element of each row of
the model's first output); a shadow's series also counts its primary's scores on the same
mirrored requests (`paired`). Like the sliding windows, a series keeps running totals and a
snapshot of them at the start of each `SLOT_SECONDS`-second slot, so a window's histogram is
"totals now minus the snapshot at the window's first slot" (a window is resolved to
`SLOT_SECONDS`). Memory per series is fixed: at most `horizon / SLOT_SECONDS` snapshots of
`features x (FEATURE_BINS + 1) + 2 x (SCORE_BINS + 1)` 64-bit counters (32 features: 3.2 KB
a snapshot, 580 KB for 30 minutes).

Only counts are kept, so histograms on the same bins add up: a series' slots can be exported
(`Histograms.export`) and added into another series (`Histograms.merge`); the guardian leader
adds up every process's histograms so. Where the bins come from is `drift.py`'s business.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

FEATURE_BINS = 10
SCORE_BINS = 20
SLOT_SECONDS = 10
#: Requests a series holds (by reference) before binning their rows together.
STAGE_REQUESTS = 64
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
        *,
        bins: str = "",
    ) -> None:
        #: The digest of the bins it counts on (`DriftBins.digest`).
        self.bins = bins
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

    @classmethod
    def merged(cls, horizon_seconds: int, size: int, clock: Callable[[], float], bins: str) -> Histograms:
        """An empty series that only `merge`s other series' slots of `size` counters (it bins no rows)."""
        features = max(0, (size - 2 * (SCORE_BINS + 1)) // (FEATURE_BINS + 1))
        return cls(horizon_seconds, np.zeros((features, FEATURE_BINS - 1)), None, clock, bins=bins)

    @property
    def size(self) -> int:
        """Counters per slot: features x (FEATURE_BINS + 1) + 2 x (SCORE_BINS + 1)."""
        return len(self._totals)

    def export(self, first_second: int) -> list[tuple[int, np.ndarray]]:
        """What each finished slot from the one holding `first_second` on added: (slot's first second, counters).

        Slots without a change are left out, and so is the current slot, which is still counting:
        an export from it, once it is over, gives it whole. So each slot crosses once, complete.
        """
        with self._lock:
            self._tick()
            self._flush()
            ring = len(self._slots)
            held = [
                (slot, snapshot)
                for slot in range(max(first_second // SLOT_SECONDS, self._slot - ring + 2), self._slot + 1)
                if (snapshot := self._slots[slot % ring][1]) is not None and self._slots[slot % ring][0] == slot
            ]
            ends = [snapshot for _, snapshot in held[1:]] + [self._totals]
            deltas = [
                (slot * SLOT_SECONDS, end - start)
                for (slot, start), end in zip(held, ends, strict=True)
                if slot < self._slot
            ]
        return [(second, delta) for second, delta in deltas if delta.any()]

    def merge(self, slots: Sequence[tuple[int, np.ndarray]]) -> None:
        """Add slots another series counted (`export`'s form, in any order): the fleet's histograms are built so.

        A slot later than this one counts as this one; one older than the horizon is dropped.
        One pass from the first slot merged to now, whatever their number.
        """
        with self._lock:
            self._tick()
            self._flush()
            now, ring, size = self._slot, len(self._slots), len(self._totals)
            items = sorted(
                ((min(second // SLOT_SECONDS, now), counts) for second, counts in slots
                 if second // SLOT_SECONDS >= now - ring + 2 and len(counts) == size),
                key=lambda item: item[0],
            )  # fmt: skip
            if not items:
                return
            held = [t for t in range(items[0][0], now + 1) if self._slots[t % ring][0] == t]
            added = np.zeros_like(self._totals)  # what this merge added before the slot being visited
            index = next_held = 0
            for slot in range(items[0][0], now + 1):
                _, snapshot = self._slots[slot % ring]
                if next_held < len(held) and held[next_held] == slot:
                    next_held += 1
                    if snapshot is not None:
                        snapshot += added
                elif index < len(items) and items[index][0] == slot:
                    # The totals when `slot` began: those when the next held slot began (nothing was
                    # counted here in between), plus what this merge added before it.
                    later = self._slots[held[next_held] % ring][1] if next_held < len(held) else None
                    self._slots[slot % ring] = (slot, (later if later is not None else self._totals) + added)
                while index < len(items) and items[index][0] == slot:
                    added += items[index][1]
                    index += 1
            self._totals += added

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


class HistogramKey(NamedTuple):
    """What a series' histograms are kept for across processes: an endpoint's version, on one set of bins."""

    endpoint: str
    bins: str
    version: str
