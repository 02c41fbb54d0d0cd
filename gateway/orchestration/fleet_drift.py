"""The drift rules across the fleet: one set of bins for every process, and the leader's sum of their histograms.

Histograms add up only on identical bins, and each process would otherwise place its own from
the first rows stable serves it. `SharedBins` makes them one: the first process whose bins
are learnt (from the rows of stable version V) stores them under `endpoint@V` (create-if-absent:
the first writer wins), and every process adopts what the store holds for its endpoint's
current stable, throwing away its own when they differ. A new stable places new bins once,
for the whole fleet. Bins placed wholly by a reference file (`drift_reference`) are the same
everywhere already and never touch the store.

`FleetHistograms` is the leader's side: every process's histogram slots (pulled with the
window counts) added up per endpoint, bins and version, read on the bins this process counts
on; slots counted on other bins (a process that has not adopted the fleet's yet) are kept
apart and never mixed in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from gateway.desired import DesiredState
from gateway.errors import GatewayError
from gateway.routing import STABLE
from gateway.state import StateStore
from gateway.telemetry.drift import DriftBins, DriftTracker, HistogramKey, Histograms, HistogramStats

log = logging.getLogger(__name__)

#: Store records of the fleet's agreed bins, keyed `endpoint@stable version`.
KIND = "drift-bins"


def encode_bins(bins: DriftBins, stable: str) -> str:
    """A store record of bins (JSON floats read back to the same float64 edges)."""
    return json.dumps(
        {
            "stable": stable,
            "source": bins.source,
            "features": None if bins.features is None else bins.features.tolist(),
            "scores": None if bins.scores is None else bins.scores.tolist(),
        }
    )


def decode_bins(body: str) -> DriftBins:
    """The inverse of `encode_bins` (ValueError for a record that is not one)."""
    try:
        fields = json.loads(body)
        features = np.asarray(fields["features"], dtype=np.float64)
        scores = None if fields["scores"] is None else np.asarray(fields["scores"], dtype=np.float64)
        source = str(fields["source"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a drift bins record: {err}") from None
    if features.ndim != 2 or (scores is not None and scores.ndim != 1):
        raise ValueError(f"not a drift bins record: features {list(features.shape)}")
    return DriftBins(features, scores, source)


class SharedBins:
    """Owns this process's side of the fleet's agreement on drift bins, one `sync` per guardian tick."""

    def __init__(self, store: StateStore, tracker: DriftTracker, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._tracker = tracker
        self._clock = clock
        self._failed = ""

    def sync(self, state: DesiredState) -> None:
        """Publish bins learnt here, adopt the fleet's, or place them again for a new stable: every tracked endpoint.

        An endpoint whose bins are agreed for its current stable costs nothing; the store is
        read only while bins are being placed. Without the store, bins stay as they are.
        """
        try:
            for endpoint in self._tracker.tracked():
                ep = state.endpoints.get(endpoint)
                stable = ep.labels.get(STABLE, "") if ep is not None else ""
                if stable:
                    self._sync(endpoint, stable)
            self._failed = ""
        except GatewayError as err:
            if err.message != self._failed:
                log.warning("drift bins not shared for now: %s", err.message)
            self._failed = err.message

    def _sync(self, endpoint: str, stable: str) -> None:
        placement = self._tracker.placement(endpoint)
        key = f"{endpoint}@{stable}"
        if placement is None or placement.shared == key:
            return
        placed = placement.bins is not None and not placement.learning
        if placed and not placement.learnt_from and not placement.shared:
            return  # a reference file placed them all: the same in every process
        stored = self._store.get_record(KIND, key)
        if stored is None and placed and placement.learnt_from == stable:
            assert placement.bins is not None
            stored = self._store.create_record(KIND, key, encode_bins(placement.bins, stable), self._clock())
        if stored is not None:
            try:
                bins = decode_bins(stored)
            except ValueError as err:
                log.error("%s: the fleet's drift bins (%s) are unreadable: %s", endpoint, key, err)
                return
            self._tracker.adopt(endpoint, DriftBins(bins.features, bins.scores, f"{bins.source}, for the fleet"), key)
        elif placed:  # bins of an earlier stable: place them again from this one's rows
            log.info("%s: stable is %s now; placing the drift bins again from its rows", endpoint, stable)
            self._tracker.relearn(endpoint)


class FleetHistograms:
    """Owns the leader's drift histograms: every process's slots added up per endpoint, bins and version."""

    def __init__(self, local: DriftTracker) -> None:
        self._local = local
        self._series: dict[HistogramKey, Histograms] = {}
        self._merged_at: dict[HistogramKey, float] = {}

    def merge(self, key: HistogramKey, slots: Sequence[tuple[int, np.ndarray]]) -> None:
        """Add one series' slots (from any process) into the fleet's."""
        if not slots:
            return
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Histograms.merged(
                self._local.horizon, len(slots[0][1]), self._local.clock, key.bins
            )
        series.merge(slots)
        self._merged_at[key] = self._local.clock()

    def forget_stale(self) -> None:
        """Drop series on bins this process no longer counts on, once nothing was added to them for the horizon."""
        now = self._local.clock()
        for key in [k for k, at in self._merged_at.items() if now - at > self._local.horizon]:
            if key.bins != self._local.digest(key.endpoint):
                del self._series[key], self._merged_at[key]

    def window(self, endpoint: str, version: str, seconds: int) -> HistogramStats | None:
        """The fleet's histograms of a version over the last `seconds`, on this process's bins (None: none)."""
        series = self._series.get(HistogramKey(endpoint, self._local.digest(endpoint), version))
        return series.window(seconds) if series is not None else None

    def status(self, endpoint: str) -> str:
        """Why an endpoint has no histograms to compare yet ("" when its bins are placed)."""
        return self._local.status(endpoint)
