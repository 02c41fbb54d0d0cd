"""Drift bins per endpoint, and the histograms of its weighted series on them (`histograms.py`), for the drift rules.

Per endpoint the bins are fixed once: `FEATURE_BINS` per input feature and `SCORE_BINS` for
the score, at quantiles of a reference. The reference is a file named in the route file
(`drift_reference`: rows of the model's features, optionally with scores), or else the first
`warmup_rows` rows that stable serves once a drift rule asks for them. Then every weighted
request of the endpoint counts its rows and scores into its version's histograms, and a
shadow's series also counts its primary's scores on the same mirrored requests, so a
shadow's score drift compares like with like.

No samples are kept after the warm-up, only counts: histograms add up across windows and
processes when they count on the same bins (`DriftBins.digest`). With many processes, every
one adopts the bins the first of them learnt (`adopt`; the orchestration layer agrees on them
through the store), and `export` hands the guardian leader every series' slots to add up.
Endpoints without a drift rule cost one set lookup.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.guardrails.drift import quantile_edges
from gateway.telemetry.histograms import (
    FEATURE_BINS,
    SCORE_BINS,
    SLOT_SECONDS,
    FloatInputs,
    HistogramKey,
    Histograms,
    HistogramStats,
    rows_of,
)

__all__ = [
    "FEATURE_BINS",
    "LEARN_FROM_ARM",
    "SCORE_BINS",
    "SLOT_SECONDS",
    "WARMUP_ROWS",
    "DriftBins",
    "DriftTracker",
    "FloatInputs",
    "HistogramKey",
    "HistogramStats",
    "Histograms",
    "Placement",
    "load_reference",
    "rows_of",
]

WARMUP_ROWS = 1000
#: Bins are learnt from the rows this arm serves (the route table's `stable` label).
LEARN_FROM_ARM = "stable"


@dataclass(frozen=True)
class DriftBins:
    """An endpoint's bin edges: [features, FEATURE_BINS - 1] and [SCORE_BINS - 1], and where they came from."""

    features: np.ndarray | None
    scores: np.ndarray | None
    source: str

    @property
    def digest(self) -> str:
        """Which bins these are: equal edges give equal digests, in any process."""
        sha = hashlib.sha256()
        for edges in (self.features, self.scores):
            sha.update(b"none" if edges is None else np.ascontiguousarray(edges, dtype="<f8").tobytes() + b"|")
            sha.update(str(() if edges is None else edges.shape).encode())
        return sha.hexdigest()[:16]

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


@dataclass(frozen=True)
class Placement:
    """Where an endpoint's bins stand: placed or not, learnt here (from which stable), agreed by the fleet."""

    bins: DriftBins | None
    #: Still learning (some bins): from stable's next rows.
    learning: bool
    #: The stable version whose rows placed bins here ("" when none did: a reference, or the fleet's).
    learnt_from: str
    #: The key under which the fleet agreed on them ("" until then).
    shared: str


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
        self.learnt_from = ""
        self.shared = ""
        self.digest = self.bins().digest

    def bins(self) -> DriftBins:
        """Its bins as they are (features None while placing)."""
        return DriftBins(self.features, self.scores, self.source)


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
        if (
            arm == LEARN_FROM_ARM
            and not state.shared
            and (state.features is None or (state.scores is None and score is not None))
        ):
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
        state.learnt_from = version
        state.digest = state.bins().digest
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
                histograms = Histograms(self.horizon, state.features, state.scores, self._clock, bins=state.digest)
                state.series = {**state.series, version: histograms}
        return histograms

    # --- the fleet: shared bins, histograms to merge ------------------------------------------------

    @property
    def clock(self) -> Callable[[], float]:
        """The clock its histograms' slots follow."""
        return self._clock

    def tracked(self) -> list[str]:
        """The endpoints whose histograms are counted."""
        return list(self._endpoints)

    def placement(self, endpoint: str) -> Placement | None:
        """Where an endpoint's bins stand (None: not tracked, or its reference file failed)."""
        state = self._endpoints.get(endpoint)
        if state is None or state.unusable:
            return None
        bins = state.bins() if state.features is not None else None
        return Placement(bins, bins is None or state.learner is not None, state.learnt_from, state.shared)

    def adopt(self, endpoint: str, bins: DriftBins, key: str) -> None:
        """Count on bins the fleet agreed on (under `key`); the histograms start afresh unless the bins are the same.

        No bin of the endpoint is learnt here any more, until `relearn`.
        """
        with self._lock:
            state = self._endpoints.get(endpoint)
            if state is None or state.unusable or bins.features is None:
                return
            if state.features is not None and state.digest == bins.digest:
                state.shared, state.learner = key, None
                return
            adopted = _Endpoint(bins)
            adopted.shared = key
            self._endpoints = {**self._endpoints, endpoint: adopted}

    def relearn(self, endpoint: str) -> None:
        """Place an endpoint's bins again from stable's next rows (a reference file's stay as they are)."""
        with self._lock:
            if endpoint in self._endpoints:
                self._endpoints = {**self._endpoints, endpoint: self._fresh(endpoint)}

    def export(self, first_second: int) -> dict[HistogramKey, list[tuple[int, np.ndarray]]]:
        """Every series' slots from the one holding `first_second` on (`Histograms.export`), by series and bins."""
        exported = {}
        for endpoint, state in list(self._endpoints.items()):
            for version, histograms in list(state.series.items()):
                slots = histograms.export(first_second)
                if slots:
                    exported[HistogramKey(endpoint, histograms.bins, version)] = slots
        return exported

    def digest(self, endpoint: str) -> str:
        """The digest of an endpoint's bins ("" when it has none)."""
        state = self._endpoints.get(endpoint)
        return state.digest if state is not None and state.features is not None else ""

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
