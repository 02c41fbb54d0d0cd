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

Latency is compared like with like (`stats.py`): each batch times one copy run on its own,
the same measure as the primary's model run of that request. With a diff log, the counts per
minute go to a counts log beside it, and `start` reads both back: reports after a restart
cover the time before it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from json.encoder import encode_basestring as _string
from pathlib import Path

import numpy as np
from opentelemetry.trace import SpanKind

from gateway.config import ShadowCompareConfig
from gateway.errors import GatewayError, InvalidInput, NotFound
from gateway.faults import FaultInjector
from gateway.registry import ModelRegistry
from gateway.settings import ShadowSettings
from gateway.shadow.compare import RequestDiff, compare_batch
from gateway.shadow.difflog import COUNTS_LOG, DIFF_LOG, DiffLog, DivergentInputs, counts_line, read_history
from gateway.shadow.stats import (
    HORIZON_SECONDS,
    LATENCY_MEASURE,
    ComparisonRecord,
    ShadowReport,
    ShadowStats,
    ShadowSummary,
)
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
        f'"shadow_version":{_string(job.shadow_version)},"primary_ms":{_number(job.primary_seconds * 1000)},'
        f'"shadow_ms":{_number(record.shadow_seconds * 1000)},"rows":{record.rows},"agree":{record.agree},'
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
        self._countslog: DiffLog | None = None
        self._counted_minute = 0  # the minute whose counts were last written
        self._divergent: DivergentInputs | None = None
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0
        self.replayed = 0  # comparisons read back from the diff log at start

    def start(self) -> None:
        """Open the diff log and start the workers (once). Copies offered before wait in the queue."""
        if self._threads:
            return
        settings = self.settings
        self.started_at = self._clock()
        if settings.log_dir:
            self._replay(settings.log_dir)
            self._difflog = DiffLog(settings.log_dir, settings.log_max_bytes, settings.log_backups)
            self._countslog = DiffLog(settings.log_dir, settings.log_max_bytes, settings.log_backups, COUNTS_LOG)
            self._counted_minute = int(self.started_at // 60)
            if settings.keep_divergent:
                self._divergent = DivergentInputs(
                    settings.log_dir / "divergent", settings.keep_divergent, settings.keep_divergent_max_bytes
                )
        self._threads = [
            threading.Thread(target=self._work, name=f"shadow-{i}", daemon=True) for i in range(settings.workers)
        ]
        for thread in self._threads:
            thread.start()

    def _replay(self, directory: Path) -> None:
        """Read back what an earlier process recorded (the last day; the newest `records` comparisons)."""
        if not (directory / DIFF_LOG).exists() and not (directory / COUNTS_LOG).exists():
            return
        history = read_history(directory, self.started_at - HORIZON_SECONDS, self.settings.records)
        for (endpoint, version), item in history.items():
            self.stats.replay(endpoint, version, item.minutes, item.records)
            self.replayed += len(item.records)
        if history:
            log.info("shadow history: %d comparisons read back from %s", self.replayed, directory)

    def _write_counts(self, *, everything: bool = False) -> None:
        """Append the counts of finished minutes (all, at shutdown) to the counts log."""
        minute = int(self._clock() // 60)
        if self._countslog is None or (minute == self._counted_minute and not everything):
            return
        self._counted_minute = minute
        lines = [counts_line(*exported) for exported in self.stats.export(everything=everything)]
        if lines:
            self._countslog.write_many(lines)

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
            self._write_counts()
            budget.spend()

    def _run_group(self, jobs: list[ShadowJob]) -> None:
        """Run copies of one shadow version as one batch, compare, record."""
        ran = self._execute(jobs)
        if ran is not None:
            self._record(*ran)

    def _execute(self, jobs: list[ShadowJob]) -> tuple[list[ShadowJob], dict[str, np.ndarray], float] | None:
        """The shadow's outputs for the copies that did not fail (None when none is left).

        Also the run time of the first live copy on its own (see the module docstring).
        """
        first = jobs[0]
        endpoint, version = first.endpoint, first.shadow_version
        live = jobs
        delay = 0.0
        try:
            model = self._registry.runnable(endpoint, version)
            fault = self._faults.get(endpoint, version)
            if fault is not None:
                if fault.latency_ms:
                    delay = fault.latency_ms / 1000
                    time.sleep(delay)
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
            alone = 0.0
            if len(live) > 1:  # time one copy on its own, first: the primary's run was of one request too
                started = time.perf_counter()
                model.run(dict(live[0].inputs), names)
                alone = time.perf_counter() - started
            started = time.perf_counter()
            outputs = dict(zip(names, model.run(inputs, names), strict=True))
            alone = alone or time.perf_counter() - started
        except Exception as err:
            code = err.code.name if isinstance(err, GatewayError) else "INTERNAL"
            for job in live:
                self._fail(job, code, str(err))
            return None
        return live, outputs, alone + delay

    def _record(self, live: list[ShadowJob], outputs: dict[str, np.ndarray], first_alone: float) -> None:
        first = live[0]
        endpoint, version = first.endpoint, first.shadow_version
        primary = {name: np.concatenate([job.primary_outputs[name] for job in live]) for name in outputs}
        diffs = compare_batch(primary, outputs, [_rows(job) for job in live], self._compare(endpoint))
        now = self._clock()
        records, lines = [], []
        for index, (job, diff) in enumerate(zip(live, diffs, strict=True)):
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
                shadow_seconds=first_alone if index == 0 else math.nan,
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
        past_shadows: Callable[[], Collection[str]] = frozenset,
        seen_elsewhere: Callable[[], Collection[str]] | None = None,
    ) -> tuple[ShadowReport, int]:
        """A shadow's report and its configured percent (`shadows`: the endpoint's shadows now).

        `version` may be empty when there is one shadow. `others(version)` gives the other
        processes' summaries of it (the fleet's report adds them to this process's).
        `past_shadows` names the versions that were shadows at any earlier route revision (asked
        only when this process has no record of the version), so "never a shadow" and "nothing
        recorded since the restart" differ; `seen_elsewhere()` the endpoint's shadows that other
        processes mirrored to (asked only when no shadow is configured, or the version named is
        known neither here nor in the route history).
        """
        local = {v for e, v in self.stats.shadows() if e == endpoint}
        if not version:
            candidates = sorted(shadows)
            if not candidates:  # none configured now: those the fleet mirrored to
                candidates = sorted(local | set(seen_elsewhere() if seen_elsewhere is not None else ()))
            if len(candidates) != 1:
                earlier = sorted(past_shadows()) if not candidates else []
                if earlier:
                    raise InvalidInput(
                        f"{endpoint} has no shadow now; earlier shadows: {', '.join(earlier)}: name one with --version"
                    )
                listed = ", ".join(candidates) or "(none)"
                raise InvalidInput(f"{endpoint} has shadows {listed}; name the version to report on")
            version = candidates[0]
        elif (
            version not in shadows
            and version not in local
            and version not in past_shadows()
            and (seen_elsewhere is None or version not in seen_elsewhere())
        ):
            listed = ", ".join(sorted(shadows)) or "(none)"
            raise NotFound(f"{endpoint} {version} has never been a shadow; shadows: {listed}")
        if window_seconds <= 0:
            raise InvalidInput(f"window {window_seconds} s must be positive")
        summary = self.stats.summary(endpoint, version, window_seconds, top)
        merged = list(others(version)) if others is not None else []
        for other in merged:
            summary.merge(other, top)
        report = summary.report()
        if merged:  # each process has its own start: a note about one would mislead in the fleet's sum
            return report, shadows.get(version, 0)
        return replace(report, note=self._note(report, version in local)), shadows.get(version, 0)

    def _note(self, report: ShadowReport, recorded: bool) -> str:
        """Where the numbers come from, when a restart is in the window."""
        now = self._clock()
        if not self.started_at or now - report.window_seconds >= self.started_at:
            return ""  # the window lies within this process's life
        start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        if self._difflog is not None:
            if self.replayed:
                return f"the time before this gateway started at {start} was read back from the diff log"
            return ""
        if not recorded or not report.mirrored:
            return (
                f"nothing recorded since this gateway started at {start}; without a diff log "
                "(--shadow-log-dir) nothing from before a restart is kept"
            )
        return f"counts since this gateway started at {start} only: without a diff log nothing from before is kept"

    @property
    def latency_measure(self) -> str:
        """How the reports' primary and shadow latency are measured (the same way for both)."""
        return LATENCY_MEASURE

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
        if self._countslog is not None:
            self._write_counts(everything=True)
            self._countslog.close()
        if self._difflog is not None:
            self._difflog.close()
