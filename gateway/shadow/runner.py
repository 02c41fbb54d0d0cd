"""`ShadowRunner`: mirrored runs on their own worker threads, never on the request path.

The request path only draws the sample and puts a job on a bounded queue (no copies: the
request's input arrays and the primary's outputs are immutable). When the queue is full the
copy is dropped and counted. Worker threads run the shadow version, compare its outputs with
the primary's, and record the comparison: in the shadow's sliding window (the guardrails'
`shadow_disagreement`), in the in-memory records reports are computed from, in the JSON-lines
diff log, and as a span linked to the primary's. A shadow that errors, hangs or is slow only
occupies its workers; the primary never waits for it.

Accounting: every mirrored copy ends up exactly once as compared, dropped, or failed
(`mirrored == compared + dropped + sum(errors)` once the queue is drained).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from opentelemetry.trace import SpanKind

from gateway.desired import EndpointState
from gateway.errors import GatewayError, InvalidInput, NotFound
from gateway.faults import FaultInjector
from gateway.registry import ModelRegistry
from gateway.shadow.compare import CompareSettings, compare_outputs
from gateway.shadow.difflog import DiffLog, DivergentInputs
from gateway.shadow.stats import ComparisonRecord, ShadowReport, ShadowStats
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.tracing import SpanRecord
from gateway.telemetry.windows import SeriesKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowSettings:
    """The shadow runner's budget and outputs."""

    queue_size: int = 1024
    workers: int = 1
    log_dir: Path | None = None
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    keep_divergent: int = 0
    keep_divergent_max_bytes: int = 50 * 1024 * 1024
    records: int = 100_000


@dataclass(frozen=True, slots=True)
class ShadowJob:
    """One mirrored request waiting for its shadow run."""

    endpoint: str
    shadow_version: str
    primary_version: str
    request_id: str
    routing_key: str
    inputs: Mapping[str, np.ndarray]
    primary_outputs: Mapping[str, np.ndarray]
    primary_seconds: float
    compare: CompareSettings
    span: SpanRecord | None


class ShadowRunner:
    """Owns the shadow queue, its worker threads and the comparison records."""

    def __init__(
        self,
        registry: ModelRegistry,
        telemetry: Telemetry,
        faults: FaultInjector | None = None,
        settings: ShadowSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or ShadowSettings()
        self._registry = registry
        self._telemetry = telemetry
        self._faults = faults or FaultInjector()
        self._clock = clock
        self.stats = ShadowStats(records=self.settings.records, clock=clock)
        self._queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=self.settings.queue_size)
        self._pending = 0  # queued or running
        self._idle = threading.Condition()
        log_dir = self.settings.log_dir
        self._difflog = (
            DiffLog(log_dir, self.settings.log_max_bytes, self.settings.log_backups) if log_dir else None
        )
        self._divergent = (
            DivergentInputs(
                log_dir / "divergent", self.settings.keep_divergent, self.settings.keep_divergent_max_bytes
            )
            if log_dir and self.settings.keep_divergent
            else None
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"shadow-{i}", daemon=True)
            for i in range(self.settings.workers)
        ]
        for thread in self._threads:
            thread.start()

    # --- the request path ----------------------------------------------------------------------

    def offer(self, job: ShadowJob) -> bool:
        """Queue a mirrored copy without blocking; False (and counted) when the queue is full."""
        self.stats.mirrored(job.endpoint, job.shadow_version)
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._pending -= 1
            self.stats.dropped(job.endpoint, job.shadow_version)
            return False
        return True

    # --- the workers -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # a bug in comparison must not kill the worker
                log.exception("shadow comparison of %s %s failed", job.endpoint, job.shadow_version)
                self.stats.failed(job.endpoint, job.shadow_version, "INTERNAL")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _run(self, job: ShadowJob) -> None:
        spans = self._telemetry.spans
        span = spans.linked(job.span, "shadow", kind=SpanKind.INTERNAL) if spans and job.span else None
        if span is not None:
            span.attributes.update(
                {
                    "gateway.endpoint": job.endpoint,
                    "gateway.shadow_version": job.shadow_version,
                    "gateway.primary_version": job.primary_version,
                    "gateway.request_id": job.request_id,
                }
            )
        started = time.perf_counter()
        try:
            model = self._registry.runnable(job.endpoint, job.shadow_version)
            fault = self._faults.get(job.endpoint, job.shadow_version)
            if fault is not None:
                if fault.latency_ms:
                    time.sleep(fault.latency_ms / 1000)
                injected = fault.error(job.endpoint, job.shadow_version)
                if injected is not None:
                    raise injected
            names = tuple(job.primary_outputs)
            outputs = dict(zip(names, model.run(job.inputs, names), strict=True))
        except Exception as err:
            code = err.code.name if isinstance(err, GatewayError) else "INTERNAL"
            self.stats.failed(job.endpoint, job.shadow_version, code)
            if span is not None and spans is not None:
                span.fail(2, code, str(err))
                spans.end(span)
            return
        shadow_seconds = time.perf_counter() - started
        diffs = compare_outputs(job.primary_outputs, outputs, job.compare)
        rows = sum(d.rows for d in diffs)
        agree = sum(d.agree for d in diffs)
        record = ComparisonRecord(
            at=self._clock(),
            request_id=job.request_id,
            primary_version=job.primary_version,
            max_abs=max((d.max_abs for d in diffs), default=0.0),
            mean_abs=max((d.mean_abs for d in diffs), default=0.0),
            max_rel=max((d.max_rel for d in diffs), default=0.0),
            rows=rows,
            agree=agree,
            primary_seconds=job.primary_seconds,
            shadow_seconds=shadow_seconds,
        )
        self.stats.compared(job.endpoint, job.shadow_version, record)
        self._telemetry.windows.window(SeriesKey(job.endpoint, job.shadow_version)).record_comparison(
            agree, rows
        )
        if self._difflog is not None:
            key_hash = (
                hashlib.blake2b(job.routing_key.encode(), digest_size=8).hexdigest()
                if job.routing_key
                else ""
            )
            self._difflog.write(
                {
                    "ts": record.at,
                    "request_id": job.request_id,
                    "routing_key_hash": key_hash,
                    "endpoint": job.endpoint,
                    "primary_version": job.primary_version,
                    "shadow_version": job.shadow_version,
                    "primary_ms": round(job.primary_seconds * 1000, 4),
                    "shadow_ms": round(shadow_seconds * 1000, 4),
                    "rows": rows,
                    "agree": agree,
                    "outputs": [d.to_dict() for d in diffs],
                }
            )
        if self._divergent is not None:
            self._divergent.offer(job.request_id, record.max_abs, job.inputs)
        if span is not None and spans is not None:
            span.attributes.update(
                {"gateway.shadow.max_abs_diff": record.max_abs, "gateway.shadow.agree": agree == rows}
            )
            spans.end(span)

    # --- reports -------------------------------------------------------------------------------

    def report(
        self, endpoint: EndpointState, version: str = "", window_seconds: int = 3600, top: int = 10
    ) -> tuple[ShadowReport, int]:
        """A shadow's report and its configured percent; `version` may be empty when there is one shadow."""
        if not version:
            configured = sorted(endpoint.shadows)
            seen = sorted(v for e, v in self.stats.shadows() if e == endpoint.name)
            candidates = configured or seen
            if len(candidates) != 1:
                listed = ", ".join(candidates) or "(none)"
                raise InvalidInput(f"{endpoint.name} has shadows {listed}; name the version to report on")
            version = candidates[0]
        elif version not in endpoint.shadows and (endpoint.name, version) not in self.stats.shadows():
            shadows = ", ".join(endpoint.shadows) or "(none)"
            raise NotFound(f"{endpoint.name} {version} has never been a shadow; shadows: {shadows}")
        if window_seconds <= 0:
            raise InvalidInput(f"window {window_seconds} s must be positive")
        report = self.stats.report(endpoint.name, version, window_seconds, top)
        return report, endpoint.shadows.get(version, 0)

    # --- lifecycle -------------------------------------------------------------------------------

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued copy has been handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    def shutdown(self) -> None:
        """Stop the workers after the queued work."""
        self.drain(10)
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(2)
        if self._difflog is not None:
            self._difflog.close()
