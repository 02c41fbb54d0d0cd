"""Request spans with almost nothing on the hot path.

A request's span is a small record (ids, start and end times, attributes, status) kept by
the servicer; when the request ends the record is queued, and a background thread exports
queued records in batches: over OTLP/gRPC with an encoder written for these records
(`gateway.telemetry.otlp`), or as OpenTelemetry SDK `ReadableSpan`s to any SDK
`SpanExporter` (the in-memory exporter in tests). Creating an SDK span per request, or
encoding with the SDK's OTLP exporter, costs more than the rest of the gateway's own work on
a request (measured in benchmarks/RESULTS.md), so neither happens on the request path.

Incoming W3C `traceparent` metadata makes the request span a child of the caller's span.
Sampling follows the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` settings.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from gateway import __version__

log = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("gateway", __version__)
_RATIO_MASK = (1 << 64) - 1
#: gRPC codes that mark a server span as an error (OpenTelemetry RPC conventions): UNKNOWN,
#: DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
SERVER_ERROR_CODES = frozenset({2, 4, 12, 13, 14, 15})


def _parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


@dataclass(frozen=True)
class Sampler:
    """Head sampling: a trace-id ratio, optionally following a remote parent's decision."""

    ratio: float = 1.0
    parent_based: bool = True

    @classmethod
    def named(cls, name: str, ratio: float | None = None) -> Sampler:
        """An OpenTelemetry sampler name (always_on, always_off, traceidratio, parentbased_*) and its ratio.

        A ratio given with an always_on sampler (the default) samples that share.
        """
        name = name.strip().lower()
        base = name.removeprefix("parentbased_")
        if base == "always_off":
            share = 0.0
        elif base == "always_on" and ratio is None:
            share = 1.0
        else:
            share = min(max(1.0 if ratio is None else ratio, 0.0), 1.0)
        return cls(ratio=share, parent_based=name.startswith("parentbased_"))

    def sampled(self, trace_id: int, parent_sampled: bool | None) -> bool:
        """Whether to record a trace."""
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        return (trace_id & _RATIO_MASK) < round(self.ratio * (1 << 64))


class SpanRecord:
    """One span in flight: filled by the request path, turned into an SDK span later."""

    __slots__ = (
        "attributes",
        "end_ns",
        "kind",
        "links",
        "message",
        "name",
        "ok",
        "parent",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(self, name: str, trace_id: int, span_id: int, parent: int, kind: SpanKind) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.kind = kind
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.attributes: dict[str, Any] = {}
        self.links: tuple[tuple[int, int], ...] = ()
        self.ok = True
        self.message = ""

    @property
    def trace_id_hex(self) -> str:
        """The trace id as 32 hex digits (what trace UIs search for)."""
        return f"{self.trace_id:032x}"

    def fail(self, code: int, name: str, message: str) -> None:
        """Record a gRPC status other than OK (numeric code and its name) on the span.

        By the OpenTelemetry RPC conventions a server span's status is ERROR only for the
        codes that mean the server failed; a refused request (INVALID_ARGUMENT, NOT_FOUND, ...)
        keeps UNSET, with its code in `rpc.grpc.status_code`.
        """
        self.attributes["rpc.grpc.status_code"] = code
        if code in SERVER_ERROR_CODES or self.kind is not SpanKind.SERVER:
            self.ok = False
            self.message = f"{name}: {message}"


class ExportError(Exception):
    """A batch was not exported; `retryable` when sending it again later may succeed (collector down)."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class SpanSink(Protocol):
    """Where finished span records go, a batch at a time (called from the export thread)."""

    def __call__(self, records: Sequence[SpanRecord]) -> None:
        """Export one batch; raise ExportError when it was not delivered."""

    def shutdown(self) -> None:
        """Release resources."""


class SdkSpanSink:
    """Hands records to any OpenTelemetry SDK `SpanExporter` as `ReadableSpan`s (in-memory, console...)."""

    def __init__(self, exporter: SpanExporter, resource: Resource) -> None:
        self.exporter = exporter
        self.resource = resource

    def convert(self, record: SpanRecord) -> ReadableSpan:
        """The SDK span of a record."""
        context = SpanContext(record.trace_id, record.span_id, is_remote=False, trace_flags=_SAMPLED)
        parent = (
            SpanContext(record.trace_id, record.parent, is_remote=True, trace_flags=_SAMPLED) if record.parent else None
        )
        links = [
            Link(SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED))
            for trace_id, span_id in record.links
        ]
        status = Status(StatusCode.UNSET) if record.ok else Status(StatusCode.ERROR, record.message)
        return ReadableSpan(
            name=record.name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=record.attributes,
            links=links,
            kind=record.kind,
            status=status,
            start_time=record.start_ns,
            end_time=record.end_ns,
            instrumentation_scope=_SCOPE,
        )

    def __call__(self, records: Sequence[SpanRecord]) -> None:
        """Export one batch through the SDK exporter."""
        self.exporter.export([self.convert(r) for r in records])

    def shutdown(self) -> None:
        """Shut the SDK exporter down."""
        self.exporter.shutdown()


class SpanRecorder:
    """Starts span records cheaply and exports them from a background thread in batches.

    Finished spans wait in a bounded buffer (`max_queue`). A batch the sink could not deliver
    for a passing reason (the collector restarting) stays at the head of the buffer and is
    sent again with exponential backoff, so a collector outage shorter than the buffer's span
    loses nothing. What does not fit is dropped, oldest first, and counted (`dropped`, the
    `gateway.spans.dropped` metric), with one log line per `log_interval`, never one per span.
    """

    def __init__(
        self,
        sink: SpanSink,
        *,
        sampler: Sampler | None = None,
        max_queue: int = 20_000,
        batch_size: int = 256,
        interval: float = 0.5,
        max_backoff: float = 5.0,
        log_interval: float = 60.0,
    ) -> None:
        self.sink = sink
        self.sampler = sampler or Sampler()
        self._queue: deque[SpanRecord] = deque(maxlen=max_queue)
        self._batch_size = batch_size
        self._interval = interval
        self._max_backoff = max_backoff
        self._log_interval = log_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        #: A batch that failed for a passing reason; sent before anything newer.
        self._retry: list[SpanRecord] = []
        self._failing = ""
        self._dropped_full = 0  # counted by request threads (end)
        self._dropped_export = 0  # counted by the export thread
        self.exported = 0
        self._dropped_logged = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the export thread (once; spans recorded before it wait in the queue)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
            self._thread.start()

    def start_span(
        self,
        name: str,
        metadata: Iterable[tuple[str, Any]] | None = None,
        *,
        kind: SpanKind = SpanKind.SERVER,
    ) -> SpanRecord | None:
        """A new span record, child of an incoming `traceparent`; None when not sampled."""
        parent_trace, parent_span, parent_sampled = 0, 0, None
        if metadata:
            for key, value in metadata:
                if key == "traceparent":
                    parsed = _parse_traceparent(value if isinstance(value, str) else value.decode())
                    if parsed:
                        parent_trace, parent_span, parent_sampled = parsed
                    break
        trace_id = parent_trace or random.getrandbits(128)
        if not self.sampler.sampled(trace_id, parent_sampled):
            return None
        return SpanRecord(name, trace_id, random.getrandbits(64), parent_span, kind)

    def linked(self, to: SpanRecord, name: str, *, kind: SpanKind = SpanKind.INTERNAL) -> SpanRecord:
        """A span in a new trace, linked to `to` (for work off the request's critical path)."""
        record = SpanRecord(name, random.getrandbits(128), random.getrandbits(64), 0, kind)
        record.links = ((to.trace_id, to.span_id),)
        return record

    def end(self, record: SpanRecord) -> None:
        """Finish a span; it is exported later. Never blocks: a full buffer drops the oldest."""
        record.end_ns = time.time_ns()
        if len(self._queue) == self._queue.maxlen:
            self._dropped_full += 1
        self._queue.append(record)
        if len(self._queue) == self._batch_size and not self._failing:  # once per batch, not per span
            self._wake.set()

    def flush(self) -> bool:
        """Export everything buffered now; False when the sink failed for a passing reason (kept for a retry)."""
        with self._flush_lock:
            while self._retry or self._queue:
                batch = self._retry
                if not batch:
                    while self._queue and len(batch) < self._batch_size:
                        batch.append(self._queue.popleft())
                self._retry = []
                try:
                    self.sink(batch)
                except ExportError as err:
                    if err.retryable and not self._stop.is_set():
                        self._retry = batch
                        self._note_failure(err.reason, len(batch))
                        return False
                    self._dropped_export += len(batch)
                    log.warning("span export refused (%s); %d spans dropped", err.reason, len(batch))
                except Exception:  # an exporter failure must not stop the thread
                    self._dropped_export += len(batch)
                    log.exception("span export failed; %d spans dropped", len(batch))
                else:
                    self.exported += len(batch)
                    if self._failing:
                        log.info("span export recovered after %s", self._failing)
                        self._failing = ""
            return True

    def _note_failure(self, reason: str, count: int) -> None:
        if not self._failing:
            log.warning(
                "span export failing (%s); keeping up to %d spans and retrying with backoff", reason, self._capacity
            )
        self._failing = reason

    @property
    def dropped(self) -> int:
        """Spans dropped since start: the buffer was full, or the collector refused them for good."""
        return self._dropped_full + self._dropped_export

    @property
    def _capacity(self) -> int:
        return (self._queue.maxlen or 0) + self._batch_size

    def _report_drops(self) -> None:
        """One log line per interval for the spans dropped in it."""
        dropped = self.dropped - self._dropped_logged
        if dropped:
            self._dropped_logged = self.dropped
            log.warning(
                "%d spans dropped in the last %.0f s (buffer of %d full or collector refused them); %d in total",
                dropped,
                self._log_interval,
                self._capacity,
                self.dropped,
            )

    def _run(self) -> None:
        delay = self._interval
        next_report = time.monotonic() + self._log_interval
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            delay = self._interval if self.flush() else min(max(delay, self._interval) * 2, self._max_backoff)
            if time.monotonic() >= next_report:
                self._report_drops()
                next_report = time.monotonic() + self._log_interval

    def shutdown(self) -> None:
        """Export what is left (one try) and stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()
        self._report_drops()
        self.sink.shutdown()
