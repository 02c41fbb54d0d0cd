"""Business outcomes joined to the requests that earned them.

`Feedback(feedback_id, outcome[, value])` arrives after the response (a click is 1, no click 0;
the value is revenue, watch time or another business value per request, when there is one), at
any process of the gateway. The feedback id each prediction returns says what served it (endpoint,
version, arm, whether pinned, the second it was served) and is signed with a key the fleet
shares (HMAC-SHA256, 128 bits): any process can count the outcome for the right version, with
no map shared between processes, and nobody without the key can make an id that counts for
another version. The outcome goes into that series' sliding window in the process that got it
(CTR and value per request per arm come from there); the guardian leader adds up every
process's windows.

`Feedback(request_id, outcome)` (without a feedback id) still joins on the process that served
the request, through a bounded, TTL-expired map. Unknown, late (older than the TTL) and forged
ids are counted, not errors, and never counted as outcomes.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import itertools
import os
import struct
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

_PREFIX = "f1."
_MAC_BYTES = 16
# served second (uint32), flags, nonce (uint64)
_HEAD = struct.Struct(">IBQ")
_PINNED = 1
#: A feedback id served up to this far in the future of this process's clock still counts (clock skew between hosts).
SKEW_SECONDS = 300.0


class Join(enum.StrEnum):
    """What became of an outcome."""

    JOINED = "joined"
    #: A request id this process did not serve (or no longer remembers).
    UNKNOWN = "unknown"
    #: A valid feedback id outside the time it counts for: older than the TTL (or from a clock far ahead).
    LATE = "late"
    #: A feedback id whose signature does not match (altered, made up, or another gateway's).
    FORGED = "forged"


@dataclass(frozen=True)
class FeedbackResult:
    """What became of one outcome."""

    joined: bool
    endpoint: str = ""
    version: str = ""
    arm: str = ""
    result: Join = Join.UNKNOWN


@dataclass(frozen=True)
class FeedbackClaim:
    """What a valid feedback id says served the request."""

    series: SeriesKey
    arm: str
    served_at: int


class FeedbackIds:
    """Issues and reads self-describing, signed feedback ids.

    An id is `f1.` + base64url(served second, flags, nonce, endpoint, version, arm, MAC): about
    70 characters for the demo endpoint. Issuing one costs one HMAC; the names' encoding is
    cached per series and arm.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._names: dict[tuple[SeriesKey, str], bytes] = {}
        # A random start per process keeps nonces apart across processes without a syscall per id.
        self._nonces = itertools.count(int.from_bytes(os.urandom(8)) & ((1 << 63) - 1))

    def issue(self, series: SeriesKey, arm: str, now: float) -> str:
        """A feedback id for a request `series` served now, on `arm`."""
        names = self._names.get((series, arm))
        if names is None:
            names = self._names[(series, arm)] = b"".join(
                len(part).to_bytes(2) + part for part in (s.encode() for s in (series.endpoint, series.version, arm))
            )
        flags = _PINNED if series.pinned else 0
        payload = _HEAD.pack(int(now) & 0xFFFFFFFF, flags, next(self._nonces) & ((1 << 64) - 1)) + names
        mac = hmac.digest(self._key, payload, "sha256")[:_MAC_BYTES]
        return _PREFIX + base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()

    def read(self, feedback_id: str) -> FeedbackClaim | None:
        """What the id claims, or None when its signature does not hold (or it is not an id at all)."""
        if not feedback_id.startswith(_PREFIX):
            return None
        body = feedback_id[len(_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _HEAD.size + 6 + _MAC_BYTES:
            return None
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.digest(self._key, payload, "sha256")[:_MAC_BYTES]):
            return None
        served, flags, _nonce = _HEAD.unpack_from(payload)
        parts, offset = [], _HEAD.size
        try:
            for _ in range(3):
                size = int.from_bytes(payload[offset : offset + 2])
                parts.append(payload[offset + 2 : offset + 2 + size].decode())
                offset += 2 + size
        except UnicodeDecodeError:
            return None
        endpoint, version, arm = parts
        return FeedbackClaim(SeriesKey(endpoint, version, bool(flags & _PINNED)), arm, served)


class FeedbackJoin:
    """A bounded, TTL-expired map of request id -> serving series, and the outcome counters."""

    def __init__(
        self,
        windows: WindowStore,
        *,
        max_entries: int = 200_000,
        ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self._windows = windows
        self._counted = counted
        self._max = max_entries
        self._ttl = ttl_seconds
        self._clock = clock
        self._served: OrderedDict[str, tuple[SeriesKey, str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._ids: FeedbackIds | None = None
        #: Outcomes by what became of them (joined, unknown, late, forged).
        self.counts = dict.fromkeys(Join, 0)

    @property
    def joined(self) -> int:
        """Outcomes counted for a version."""
        return self.counts[Join.JOINED]

    @property
    def unknown(self) -> int:
        """Outcomes for request ids this process does not know."""
        return self.counts[Join.UNKNOWN]

    def sign_with(self, key: bytes) -> None:
        """Issue and accept feedback ids signed with `key` (the fleet's, so every process reads every id)."""
        self._ids = FeedbackIds(key)

    def feedback_id(self, series: SeriesKey, arm: str) -> str:
        """The id a client sends its outcome with, from any process ("" before `sign_with`)."""
        return self._ids.issue(series, arm, self._clock()) if self._ids is not None else ""

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

    def feedback(
        self, request_id: str, outcome: float, value: float | None = None, *, feedback_id: str = ""
    ) -> FeedbackResult:
        """Count one outcome (and its business value) for what served it.

        Unknown, late and forged ids are counted and reported, not errors.
        """
        if not request_id and not feedback_id:
            raise InvalidInput("send the feedback_id the Predict response carried (or its request_id)")
        check_text(request_id, "request_id", MAX_ID_CHARS)
        check_text(feedback_id, "feedback_id", MAX_ID_CHARS)
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
        if feedback_id:
            return self._signed(feedback_id, outcome, value)
        with self._lock:
            entry = self._served.pop(request_id, None)
            if entry is None or self._clock() - entry[2] > self._ttl:
                self._count(Join.UNKNOWN)
                return FeedbackResult(False, result=Join.UNKNOWN)
            self._count(Join.JOINED)
        series, arm, _ = entry
        self._windows.window(series).record_outcome(outcome, value)
        return FeedbackResult(True, series.endpoint, series.version, arm, Join.JOINED)

    def _count(self, result: Join) -> None:
        """Count an outcome's result (call with the lock held)."""
        self.counts[result] += 1
        if self._counted is not None:
            self._counted(result.value)

    def _signed(self, feedback_id: str, outcome: float, value: float | None) -> FeedbackResult:
        claim = self._ids.read(feedback_id) if self._ids is not None else None
        if claim is None:
            result = Join.FORGED
        elif not -SKEW_SECONDS <= self._clock() - claim.served_at <= self._ttl:
            result = Join.LATE
        else:
            result = Join.JOINED
        with self._lock:
            self._count(result)
        if claim is None or result is not Join.JOINED:
            return FeedbackResult(False, result=result)
        self._windows.window(claim.series).record_outcome(outcome, value)
        series = claim.series
        return FeedbackResult(True, series.endpoint, series.version, claim.arm, Join.JOINED)
