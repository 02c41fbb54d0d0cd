"""Business outcomes joined to the requests that earned them.

`Feedback(request_id, outcome[, value])` arrives after the response (a click is 1, no click 0;
the value is revenue, watch time or another business value per request, when there is one). The
join keeps, for a bounded time and number of requests, which endpoint, version and arm served
each request id; an outcome for a known id goes into that series' sliding window (CTR per
arm and value per request come from there). Late or unknown ids are counted, not errors.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import InvalidInput
from gateway.limits import MAX_ID_CHARS, check_text
from gateway.telemetry.windows import SeriesKey, WindowStore

#: Largest business value one outcome may carry (its square must stay far from overflow).
MAX_VALUE = 1e12


@dataclass(frozen=True)
class FeedbackResult:
    """What became of one outcome."""

    joined: bool
    endpoint: str = ""
    version: str = ""
    arm: str = ""


class FeedbackJoin:
    """A bounded, TTL-expired map of request id -> serving series, and the outcome counters.

    Bounded in bytes too: ids longer than `limits.MAX_ID_CHARS` never get here (the request is
    refused), so the map holds at most `max_entries` ids of at most that size.
    """

    def __init__(
        self,
        windows: WindowStore,
        *,
        max_entries: int = 200_000,
        ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._windows = windows
        self._max = max_entries
        self._ttl = ttl_seconds
        self._clock = clock
        self._served: OrderedDict[str, tuple[SeriesKey, str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.joined = 0
        self.unknown = 0

    def served(self, request_id: str, series: SeriesKey, arm: str) -> None:
        """Remember who served a request (hot path: one insert, amortised eviction)."""
        now = self._clock()
        with self._lock:
            served = self._served
            served[request_id] = (series, arm, now)
            if len(served) > self._max:
                served.popitem(last=False)
            while served:
                oldest = next(iter(served.values()))
                if now - oldest[2] <= self._ttl:
                    break
                served.popitem(last=False)

    def feedback(self, request_id: str, outcome: float, value: float | None = None) -> FeedbackResult:
        """Join one outcome (and its business value); an unknown or expired id is counted and reported, not an error."""
        if not request_id:
            raise InvalidInput("request_id is empty; send the id the Predict response carried")
        check_text(request_id, "request_id", MAX_ID_CHARS)
        if not 0.0 <= outcome <= 1.0:  # NaN fails this too
            # The CTR guardrail reads outcomes as rates: one caller's 1e300 or -5 would move it at will.
            raise InvalidInput(
                f"outcome {outcome} must be between 0 and 1 (1 for a click, 0 for none)", field="outcome"
            )
        if value is not None and not abs(value) <= MAX_VALUE:  # NaN fails this too
            # The value rule sums values and their squares: 1e300 would overflow them for everyone.
            raise InvalidInput(
                f"value {value} must be a finite number within +-{MAX_VALUE:g} (revenue, watch time, ...), "
                "or left unset",
                field="value",
            )
        with self._lock:
            entry = self._served.pop(request_id, None)
            if entry is None or self._clock() - entry[2] > self._ttl:
                self.unknown += 1
                return FeedbackResult(False)
            self.joined += 1
        series, arm, _ = entry
        self._windows.window(series).record_outcome(outcome, value)
        return FeedbackResult(True, series.endpoint, series.version, arm)
