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
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _string

import numpy as np
from opentelemetry.trace import SpanKind

from gateway.config import ShadowCompareConfig
from gateway.errors import GatewayError, InvalidInput, NotFound
from gateway.faults import FaultInjector
from gateway.registry import ModelRegistry
from gateway.settings import ShadowSettings
from gateway.shadow.compare import RequestDiff, compare_batch
from gateway.shadow.difflog import DiffLog, DivergentInputs
from gateway.shadow.stats import ComparisonRecord, ShadowReport, ShadowStats, ShadowSummary
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.tracing import SpanRecord
from gateway.telemetry.windows import SeriesKey

log = logging.getLogger(__name__)


class CpuBudget:
    """Keeps a worker thread's CPU time under a share of one core, measured over ~1 s.

    When the shadow runs over its share, the worker pauses; the queue fills and further
    copies are dropped and counted, so an overloaded gateway sheds shadow work instead of
    slowing its primaries.
    """

    def __init__(self, share: float) -> None:
        self.share = share
        self._wall = time.monotonic()
        self._cpu = time.thread_time()

    def spend(self) -> None:
        """Call after each batch; sleeps when the thread is over budget."""
        if self.share <= 0:
            return
        wall, cpu = time.monotonic(), time.thread_time()
        elapsed, used = wall - self._wall, cpu - self._cpu
        over = used / self.share - elapsed
        if over > 0:
            time.sleep(min(over, 1.0))
        if elapsed > 1.0:  # start a new accounting period, carrying any debt
            self._wall, self._cpu = time.monotonic(), time.thread_time()


def _rows(job: ShadowJob) -> int:
    first = next(iter(job.inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def _groups(batch: list[ShadowJob]) -> list[list[ShadowJob]]:
    """Jobs that can run as one batch: same shadow, same outputs, same per-row input shapes."""
    groups: dict[tuple[object, ...], list[ShadowJob]] = {}
    for job in batch:
        key = (
            job.endpoint,
            job.shadow_version,
            tuple(job.primary_outputs),
            tuple((name, a.dtype.str, a.shape[1:]) for name, a in job.inputs.items()),
        )
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def _number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else "null"


def _log_line(job: ShadowJob, record: ComparisonRecord, diff: RequestDiff) -> str:
    """One JSON line, formatted directly (json.dumps per line was most of a comparison's cost)."""
    key_hash = hashlib.blake2b(job.routing_key.encode(), digest_size=8).hexdigest() if job.routing_key else ""
    outputs = ",".join(
        "{"
        f'"name":{_string(o["name"])},"max_abs":{_number(o["max_abs"])},"mean_abs":{_number(o["mean_abs"])},'
        f'"max_rel":{_number(o["max_rel"])},"rows":{o["rows"]},"agree":{o["agree"]}'
        + (f',"top_k_overlap":{_number(o["top_k_overlap"])}' if "top_k_overlap" in o else "")
        + (',"shape_mismatch":true' if o.get("shape_mismatch") else "")
        + "}"
        for o in diff.outputs
    )
    return (
        f'{{"ts":{record.at:.6f},"request_id":{_string(job.request_id)},"routing_key_hash":"{key_hash}",'
        f'"endpoint":{_string(job.endpoint)},"primary_version":{_string(job.primary_version)},'
        f'"shadow_version":{_string(job.shadow_version)},"primary_ms":{job.primary_seconds * 1000:.4f},'
        f'"shadow_ms":{record.shadow_seconds * 1000:.4f},"rows":{record.rows},"agree":{record.agree},'
        f'"outputs":[{outputs}]}}'
    )


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
        compare: Callable[[str], ShadowCompareConfig] = lambda _endpoint: ShadowCompareConfig(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or ShadowSettings()
        self._compare = compare
        self._registry = registry
        self._telemetry = telemetry
        self._faults = faults or FaultInjector()
        self._clock = clock
        self.stats = ShadowStats(records=self.settings.records, clock=clock)
        # A plain deque: the request path appends (one producer, the serving loop) without a lock
        # or a wake-up; workers collect what has queued every `poll_seconds`, as one batch.
        self._queue: deque[ShadowJob] = deque()
        self._running = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._difflog: DiffLog | None = None
        self._divergent: DivergentInputs | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Open the diff log and start the workers (once). Copies offered before wait in the queue."""
        if self._threads:
            return
        settings = self.settings
        if settings.log_dir:
            self._difflog = DiffLog(settings.log_dir, settings.log_max_bytes, settings.log_backups)
            if settings.keep_divergent:
                self._divergent = DivergentInputs(
                    settings.log_dir / "divergent", settings.keep_divergent, settings.keep_divergent_max_bytes
                )
        self._threads = [
            threading.Thread(target=self._work, name=f"shadow-{i}", daemon=True) for i in range(settings.workers)
        ]
        for thread in self._threads:
            thread.start()

    # --- the request path ----------------------------------------------------------------------

    def offer(self, job: ShadowJob) -> bool:
        """Queue a mirrored copy without blocking; False (and counted) when the queue is full.

        Copies that are queued are counted as mirrored when a worker takes them.
        """
        if len(self._queue) >= self.settings.queue_size:
            self.stats.mirrored(job.endpoint, job.shadow_version)
            self.stats.dropped(job.endpoint, job.shadow_version)
            return False
        self._queue.append(job)
        return True

    # --- the workers -----------------------------------------------------------------------------

    def _take(self) -> list[ShadowJob]:
        """Up to batch_size queued copies (counted as mirrored), oldest first."""
        batch: list[ShadowJob] = []
        with self._lock:
            while self._queue and len(batch) < self.settings.batch_size:
                batch.append(self._queue.popleft())
            self._running += len(batch)
        for job in batch:
            self.stats.mirrored(job.endpoint, job.shadow_version)
        return batch

    def _work(self) -> None:
        budget = CpuBudget(self.settings.max_cpu_share)
        while not self._stop.is_set() or self._queue:
            batch = self._take()
            if not batch:
                self._stop.wait(self.settings.poll_seconds)
                continue
            try:
                for group in _groups(batch):
                    self._run_group(group)
            except Exception:  # a bug in comparison must not kill the worker
                log.exception("shadow comparison failed for %d copies", len(batch))
                for job in batch:
                    self.stats.failed(job.endpoint, job.shadow_version, "INTERNAL")
            finally:
                with self._lock:
                    self._running -= len(batch)
            budget.spend()

    def _run_group(self, jobs: list[ShadowJob]) -> None:
        """Run copies of one shadow version as one batch, compare, record."""
        ran = self._execute(jobs)
        if ran is not None:
            self._record(*ran)

    def _execute(self, jobs: list[ShadowJob]) -> tuple[list[ShadowJob], dict[str, np.ndarray], float] | None:
        """The shadow's outputs for the copies that did not fail (None when none is left)."""
        first = jobs[0]
        endpoint, version = first.endpoint, first.shadow_version
        started = time.perf_counter()
        live = jobs
        try:
            model = self._registry.runnable(endpoint, version)
            fault = self._faults.get(endpoint, version)
            if fault is not None:
                if fault.latency_ms:
                    time.sleep(fault.latency_ms / 1000)
                live = []
                for job in jobs:
                    injected = fault.error(endpoint, version)
                    if injected is None:
                        live.append(job)
                    else:
                        self._fail(job, injected.code.name, injected.message)
                if not live:
                    return None
            names = tuple(first.primary_outputs)
            inputs = {name: np.concatenate([job.inputs[name] for job in live]) for name in first.inputs}
            outputs = dict(zip(names, model.run(inputs, names), strict=True))
        except Exception as err:
            code = err.code.name if isinstance(err, GatewayError) else "INTERNAL"
            for job in live:
                self._fail(job, code, str(err))
            return None
        return live, outputs, (time.perf_counter() - started) / len(live)

    def _record(self, live: list[ShadowJob], outputs: dict[str, np.ndarray], shadow_seconds: float) -> None:
        first = live[0]
        endpoint, version = first.endpoint, first.shadow_version
        primary = {name: np.concatenate([job.primary_outputs[name] for job in live]) for name in outputs}
        diffs = compare_batch(primary, outputs, [_rows(job) for job in live], self._compare(endpoint))
        now = self._clock()
        records, lines = [], []
        for job, diff in zip(live, diffs, strict=True):
            record = ComparisonRecord(
                at=now,
                request_id=job.request_id,
                primary_version=job.primary_version,
                max_abs=diff.max_abs,
                mean_abs=diff.mean_abs,
                max_rel=diff.max_rel,
                rows=diff.rows,
                agree=diff.agree,
                primary_seconds=job.primary_seconds,
                shadow_seconds=shadow_seconds,
            )
            records.append(record)
            if self._difflog is not None:
                lines.append(_log_line(job, record, diff))
            if self._divergent is not None:
                self._divergent.offer(job.request_id, record.max_abs, job.inputs)
            span = self._shadow_span(job)
            if span is not None:
                span.attributes["gateway.shadow.max_abs_diff"] = diff.max_abs
                span.attributes["gateway.shadow.agree"] = diff.agree == diff.rows
                self._end_span(span)
        self.stats.compared_many(endpoint, version, records)
        self._telemetry.windows.window(SeriesKey(endpoint, version)).record_comparison(
            sum(r.agree for r in records), sum(r.rows for r in records)
        )
        score = next(iter(outputs))  # the first output: the score the drift rules compare
        self._telemetry.drift.observe_shadow(endpoint, version, outputs[score], primary[score])
        if self._difflog is not None:
            self._difflog.write_many(lines)

    def _fail(self, job: ShadowJob, code: str, message: str) -> None:
        self.stats.failed(job.endpoint, job.shadow_version, code)
        span = self._shadow_span(job)
        if span is not None:
            span.fail(2, code, message)
            self._end_span(span)

    def _shadow_span(self, job: ShadowJob) -> SpanRecord | None:
        """A span for a traced copy's shadow run, linked to the primary's (None when not traced)."""
        spans = self._telemetry.spans
        if spans is None or job.span is None:
            return None
        span = spans.linked(job.span, "shadow", kind=SpanKind.INTERNAL)
        span.attributes.update(
            {
                "gateway.endpoint": job.endpoint,
                "gateway.shadow_version": job.shadow_version,
                "gateway.primary_version": job.primary_version,
                "gateway.request_id": job.request_id,
            }
        )
        return span

    def _end_span(self, span: SpanRecord) -> None:
        assert self._telemetry.spans is not None
        self._telemetry.spans.end(span)

    # --- reports -------------------------------------------------------------------------------

    def report(
        self,
        endpoint: str,
        shadows: Mapping[str, int],
        version: str = "",
        window_seconds: int = 3600,
        top: int = 10,
        *,
        others: Callable[[str], Sequence[ShadowSummary]] | None = None,
    ) -> tuple[ShadowReport, int]:
        """A shadow's report and its configured percent (`shadows`: the endpoint's shadows now).

        `version` may be empty when there is one shadow. `others(version)` gives the other
        processes' summaries of it (the fleet's report adds them to this process's).
        """
        if not version:
            configured = sorted(shadows)
            seen = sorted(v for e, v in self.stats.shadows() if e == endpoint)
            candidates = configured or seen
            if len(candidates) != 1:
                listed = ", ".join(candidates) or "(none)"
                raise InvalidInput(f"{endpoint} has shadows {listed}; name the version to report on")
            version = candidates[0]
        elif version not in shadows and (endpoint, version) not in self.stats.shadows():
            listed = ", ".join(shadows) or "(none)"
            raise NotFound(f"{endpoint} {version} has never been a shadow; shadows: {listed}")
        if window_seconds <= 0:
            raise InvalidInput(f"window {window_seconds} s must be positive")
        summary = self.stats.summary(endpoint, version, window_seconds, top)
        for other in others(version) if others is not None else ():
            summary.merge(other, top)
        return summary.report(), shadows.get(version, 0)

    # --- lifecycle -------------------------------------------------------------------------------

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued copy has been handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue or self._running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def shutdown(self) -> None:
        """Stop the workers after the queued work (copies queued before `start` are dropped)."""
        if self._threads:
            self.drain(10)
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        if self._difflog is not None:
            self._difflog.close()
