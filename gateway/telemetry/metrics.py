"""`Telemetry`: the one measurement call per request, feeding windows and OpenTelemetry metrics.

Instruments (Prometheus names in brackets):
- `gateway.request.duration` histogram, seconds, by endpoint, version, arm, code
  [`gateway_request_duration_seconds_bucket|_sum|_count`];
- `gateway.requests` counter by endpoint, version, arm, code [`gateway_requests_total`];
- `gateway.request.errors` counter by endpoint, version, arm, code, with every error code of
  every loaded version present at 0 before the first error [`gateway_request_errors_total`];
- `gateway.route.revision` gauge [`gateway_route_revision`];
- `gateway.store.connected` gauge, 1 while the state store answers, 0 while this process
  serves its last known routes without it [`gateway_store_connected`];
- `gateway.version.traffic` gauge, percent by endpoint and version [`gateway_version_traffic_percent`];
- `gateway.requests.in_flight` gauge, requests admitted and not yet answered (queued in a batch or
  running) by endpoint and version [`gateway_requests_in_flight`];
- `gateway.admin.changes` counter by endpoint, action, trigger [`gateway_admin_changes_total`];
- `gateway.rollbacks` counter by endpoint and trigger [`gateway_rollbacks_total`];
- `gateway.model.load.duration` histogram by endpoint and version [`gateway_model_load_duration_seconds`];
- `gateway.input.rows` and `gateway.input.nulls` (by feature) counters, for null rates
  [`gateway_input_rows_total`, `gateway_input_nulls_total`];
- the release guardrails' instruments (timeouts, feedback values, what the guardian saw,
  process memory): `gateway/telemetry/guardrail_metrics.py`;
- `gateway.feedback` counter of outcomes by result: joined, unknown, late, forged
  [`gateway_feedback_total`].

The request count and error counters are observed from the gateway's own cumulative counts
at collection time, and the duration histogram is aggregated by the gateway
(`gateway.telemetry.durations`): the hot path makes no OpenTelemetry SDK call at all.

Units follow the OpenTelemetry conventions: seconds for durations (as `rpc.server.call.duration`),
`{request}`-style annotations for counts (Prometheus names leave them out). The duration is per
model request with the gateway's attributes; a second, RPC-level histogram would cost another
observation per call for the same figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider

from gateway import __version__
from gateway.telemetry import guardrail_metrics
from gateway.telemetry.drift import DriftTracker
from gateway.telemetry.durations import LATENCY_BUCKETS, DurationHistogram
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.tracing import SpanRecorder
from gateway.telemetry.windows import SeriesKey, WindowStore

__all__ = ["ERROR_CODES", "LATENCY_BUCKETS", "Telemetry", "VersionTotals"]
#: Codes pre-created at 0 for every loaded version, so error ratios exist before the first error.
ERROR_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")


@dataclass
class VersionTotals:
    """A version's requests since the process started: successes and failures with their time."""

    success_count: int = 0
    success_seconds: float = 0.0
    success_rows: int = 0
    fail_count: int = 0
    fail_seconds: float = 0.0
    #: Wall-clock time of the last request (0: none yet).
    last_at: float = 0.0
    #: Model runs (a batch of several requests is one) and the seconds they took.
    executions: float = 0.0
    compute_seconds: float = 0.0


class Telemetry:
    """Owns the windows, the OpenTelemetry instruments and the span recorder of one gateway.

    Beside the windows: the drift histograms (`drift`), the process memory samples (`memory`)
    and the guardian's last observations (`gauges`), all on the windows' clock.
    """

    def __init__(
        self,
        windows: WindowStore | None = None,
        *,
        meter_provider: MeterProvider | None = None,
        spans: SpanRecorder | None = None,
        memory: MemoryWindow | None = None,
        durations: DurationHistogram | None = None,
    ) -> None:
        self.windows = windows or WindowStore()
        self.drift = DriftTracker(self.windows.horizon, clock=self.windows.clock)
        self.memory = memory or MemoryWindow(self.windows.horizon, clock=self.windows.clock)
        self.gauges = guardrail_metrics.GuardrailGauges()
        #: Requests in flight per (endpoint, version), read when metrics are collected (set by the gateway).
        self.in_flight: Callable[[], Mapping[tuple[str, str], int]] = dict
        self._arms: dict[tuple[str, str], str] = {}
        self.meter_provider = meter_provider
        self.spans = spans
        #: The request-duration histogram, kept when metrics are on (its exporters read it).
        self.durations = durations or DurationHistogram()
        self._observe_durations = meter_provider is not None
        self._lock = self.durations.lock
        self._counts: dict[tuple[str, str, str, str], int] = {}
        # Per (endpoint, version, arm, code): [seconds, rows, wall time of the last request, model runs
        # (each request adds its share of a batch's), their seconds].
        self._sums: dict[tuple[str, str, str, str], list[float]] = {}
        self._rows: dict[tuple[str, str, str], int] = {}
        self._nulls: dict[tuple[str, str, str, str], int] = {}
        self._revision = 0
        self._store_connected = 1
        self._traffic: dict[tuple[str, str], int] = {}
        if meter_provider is not None:
            self._instruments(meter_provider)

    def _instruments(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("gateway", __version__)
        meter.create_observable_counter(
            "gateway.requests",
            [self._observe_requests],
            unit="{request}",
            description="Requests by endpoint, version, arm and code",
        )
        meter.create_observable_counter(
            "gateway.request.errors",
            [self._observe_errors],
            unit="{request}",
            description="Failed requests by endpoint, version, arm and code (0 for every loaded version)",
        )
        meter.create_observable_gauge(
            "gateway.route.revision", [self._observe_revision], description="Route revision being served"
        )
        meter.create_observable_gauge(
            "gateway.store.connected",
            [lambda _options: [Observation(self._store_connected)]],
            description="1 while the state store answers; 0 while serving the last known routes without it",
        )
        meter.create_observable_gauge(
            "gateway.requests.in_flight",
            [self._observe_in_flight],
            unit="{request}",
            description="Requests admitted and not yet answered, by endpoint and version (queued or running)",
        )
        meter.create_observable_gauge(
            "gateway.version.traffic",
            [self._observe_traffic],
            unit="%",
            description="Weighted traffic share per version",
        )
        meter.create_observable_counter(
            "gateway.input.rows",
            [self._observe_rows],
            unit="{row}",
            description="Input rows (batch items) by version and arm",
        )
        meter.create_observable_counter(
            "gateway.input.nulls",
            [self._observe_nulls],
            unit="{value}",
            description="NaN (missing) input values by version, arm and feature",
        )
        self._admin_changes = meter.create_counter(
            "gateway.admin.changes", unit="{change}", description="Route changes by endpoint, action and trigger"
        )
        self._rollbacks = meter.create_counter(
            "gateway.rollbacks", unit="{rollback}", description="Rollbacks by endpoint and trigger"
        )
        if self.spans is not None:
            spans = self.spans
            meter.create_observable_counter(
                "gateway.spans.dropped",
                [lambda _options: [Observation(spans.dropped)]],
                unit="{span}",
                description="Spans not exported: the export buffer was full or the collector refused them",
            )
        guardrail_metrics.register(
            meter, self.windows, self.gauges, self.memory, lambda e, v: self._arms.get((e, v), v)
        )
        self._feedback = meter.create_counter(
            "gateway.feedback",
            unit="{outcome}",
            description="Outcomes sent with Feedback, by result (joined, unknown, late, forged)",
        )
        self._load_duration = meter.create_histogram(
            "gateway.model.load.duration",
            unit="s",
            description="Time to verify, load and warm a version",
            explicit_bucket_boundaries_advisory=[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0],
        )

    # --- the hot path ---------------------------------------------------------------------

    def record(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        series: SeriesKey,
        arm: str,
        code: str,
        seconds: float,
        rows: int = 0,
        nan_per_feature: Sequence[int] | None = None,
        features: Sequence[str] = (),
        run_seconds: float = 0.0,
        shared: int = 0,
    ) -> None:
        """One request: feeds the series' window, the counters and (metrics on) the latency histogram.

        `features` names the model's float input features; `nan_per_feature` (None when the
        request had no NaN) counts NaNs per feature. A served request gives its model run's
        seconds and how many requests `shared` it (a batch; 0: no run): its share of the run.
        """
        key = (series.endpoint, series.version, arm, code)
        rows_key = (series.endpoint, series.version, arm)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            sums = self._sums.get(key)
            if sums is None:
                sums = self._sums[key] = [0.0, 0, 0.0, 0.0, 0.0]
            sums[0] += seconds
            sums[1] += rows
            sums[2] = time.time()
            if shared:
                sums[3] += 1 / shared
                sums[4] += run_seconds / shared
            self._rows[rows_key] = self._rows.get(rows_key, 0) + rows
            if nan_per_feature is not None:
                for name, count in zip(features, nan_per_feature, strict=False):
                    if count:
                        null_key = (*rows_key, name)
                        self._nulls[null_key] = self._nulls.get(null_key, 0) + count
            if self._observe_durations:
                self.durations.observe(key, seconds)
        self.windows.window(series, len(features)).record(seconds, code, rows, nan_per_feature)

    def abandoned(self, series: SeriesKey) -> None:
        """A request already recorded whose caller had gone (deadline or cancellation) when its answer was ready."""
        self.windows.window(series).record_abandoned()

    # --- changes and lifecycle --------------------------------------------------------------

    def routes_changed(self, revision: int, versions: Iterable[tuple[str, str, str, int]]) -> None:
        """A new route revision: (endpoint, version, arm, traffic percent) of every version."""
        traffic = {}
        with self._lock:
            self._revision = revision
            for endpoint, version, arm, share in versions:
                traffic[(endpoint, version)] = share
                self._arms[(endpoint, version)] = arm
                for series_arm in (arm, "pinned"):
                    for code in ERROR_CODES:
                        self._counts.setdefault((endpoint, version, series_arm, code), 0)
            self._traffic = traffic

    def store_changed(self, connected: bool) -> None:
        """The state store became reachable (or unreachable)."""
        self._store_connected = int(connected)

    def model_loaded(self, endpoint: str, version: str, seconds: float) -> None:
        """A version finished loading."""
        if self.meter_provider is not None:
            self._load_duration.record(seconds, {"endpoint": endpoint, "version": version})

    def admin_change(self, endpoint: str, action: str, trigger: str) -> None:
        """A committed route change (trigger: manual, guardrail, rollout, ...)."""
        if self.meter_provider is not None:
            for name in endpoint.split(","):
                self._admin_changes.add(1, {"endpoint": name, "action": action, "trigger": trigger})
                if action == "rollback":
                    self._rollbacks.add(1, {"endpoint": name, "trigger": trigger})

    def feedback_counted(self, result: str) -> None:
        """An outcome arrived and was joined, or counted as unknown, late or forged."""
        if self.meter_provider is not None:
            self._feedback.add(1, {"result": result})

    # --- observation callbacks --------------------------------------------------------------

    def _observations(self, *, errors: bool) -> list[Observation]:
        """Error series include the pre-created zeros; request series only what happened."""
        with self._lock:
            items = list(self._counts.items())
        return [
            Observation(count, {"endpoint": e, "version": v, "arm": a, "code": c})
            for (e, v, a, c), count in items
            if (c != "OK" if errors else count > 0)
        ]

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observations(errors=False)

    def _observe_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observations(errors=True)

    def _observe_rows(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._rows.items())
        return [Observation(n, {"endpoint": e, "version": v, "arm": a}) for (e, v, a), n in items]

    def _observe_nulls(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._nulls.items())
        return [Observation(n, {"endpoint": e, "version": v, "arm": a, "feature": f}) for (e, v, a, f), n in items]

    def _observe_revision(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._revision)]

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"endpoint": e, "version": v}) for (e, v), n in self.in_flight().items()]

    def _observe_traffic(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(share, {"endpoint": e, "version": v}) for (e, v), share in self._traffic.items()]

    def start(self) -> None:
        """Start background export (spans); idempotent."""
        if self.spans is not None:
            self.spans.start()

    def version_totals(self) -> dict[tuple[str, str], VersionTotals]:
        """Cumulative totals per (endpoint, version), over every arm, since the process started."""
        with self._lock:
            items = [(key, self._counts[key], list(sums)) for key, sums in self._sums.items()]
        totals: dict[tuple[str, str], VersionTotals] = {}
        for (endpoint, version, _arm, code), count, (seconds, rows, last, executions, compute) in items:
            t = totals.setdefault((endpoint, version), VersionTotals())
            if code == "OK":
                t.success_count += count
                t.success_seconds += seconds
                t.success_rows += int(rows)
            else:
                t.fail_count += count
                t.fail_seconds += seconds
            t.last_at = max(t.last_at, last)
            t.executions += executions
            t.compute_seconds += compute
        return totals

    def shutdown(self) -> None:
        """Flush spans and metrics."""
        if self.spans is not None:
            self.spans.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
