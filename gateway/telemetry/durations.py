"""`gateway.request.duration`: the per-request latency histogram, aggregated by the gateway itself.

The OpenTelemetry SDK's `Histogram.record` copies, cleans and hashes the attributes and runs
the exemplar filter for every measurement, once per reader: about 30 us of CPU per request
with a Prometheus and an OTLP reader (measured in benchmarks/RESULTS.md), more than the rest
of the gateway's request path. Here a request costs one bisect and a few additions under the
lock `Telemetry.record` already holds, and the totals reach the two exporters the gateway
builds when they read:

- Prometheus: a collector on the same registry writes `gateway_request_duration_seconds`
  (`_bucket`, `_sum`, `_count`) with the labels the OpenTelemetry exporter gives every metric;
- OTLP: the metric exporter adds one cumulative histogram to each export
  (`gateway.telemetry.otlp_metrics`).

Same name, unit, buckets and attributes as an SDK histogram would have; cumulative only.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ScopeMetrics,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway import __version__

NAME = "gateway.request.duration"
DESCRIPTION = "Time to serve a request in the gateway, by endpoint, version, arm and status code"
#: Explicit latency buckets, 100 us to 10 s (upper bounds, inclusive).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_LABELS = ("endpoint", "version", "arm", "code")
_SCOPE = InstrumentationScope("gateway", __version__)

Key = tuple[str, str, str, str]


class _Series:
    __slots__ = ("buckets", "count", "max", "min", "start_ns", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = 0.0
        self.start_ns = time.time_ns()


class DurationHistogram:
    """Cumulative latency histograms per (endpoint, version, arm, code).

    `observe` is called with `lock` held (`Telemetry.record` shares it for its counters);
    readers copy the totals under it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._series: dict[Key, _Series] = {}

    def observe(self, key: Key, seconds: float) -> None:
        """One request's latency (caller holds `lock`)."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series.count += 1
        series.sum += seconds
        if seconds < series.min:  # noqa: PLR1730 - per request: a comparison is cheaper than min()
            series.min = seconds
        if seconds > series.max:  # noqa: PLR1730
            series.max = seconds

    def snapshot(self) -> list[tuple[Key, _Series]]:
        """A consistent copy of every series."""
        with self.lock:
            copies = []
            for key, series in self._series.items():
                copy = _Series.__new__(_Series)
                copy.buckets = series.buckets[:]
                copy.count, copy.sum, copy.min, copy.max = series.count, series.sum, series.min, series.max
                copy.start_ns = series.start_ns
                copies.append((key, copy))
            return copies

    # --- OTLP ---------------------------------------------------------------------------------

    def metric(self) -> Metric | None:
        """The histogram as an SDK metric (cumulative), or None before the first request."""
        now = time.time_ns()
        points = [
            HistogramDataPoint(
                attributes=dict(zip(_LABELS, key, strict=True)),
                start_time_unix_nano=series.start_ns,
                time_unix_nano=now,
                count=series.count,
                sum=series.sum,
                bucket_counts=series.buckets,
                explicit_bounds=LATENCY_BUCKETS,
                min=series.min,
                max=series.max,
            )
            for key, series in self.snapshot()
        ]
        if not points:
            return None
        data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        return Metric(name=NAME, description=DESCRIPTION, unit="s", data=data)

    def added_to(self, metrics_data: MetricsData) -> MetricsData:
        """`metrics_data` with this histogram in the gateway's scope of its first resource."""
        metric = self.metric()
        if metric is None or not metrics_data.resource_metrics:
            return metrics_data
        first, *rest = metrics_data.resource_metrics
        scopes = list(first.scope_metrics)
        for index, scope in enumerate(scopes):
            if scope.scope.name == _SCOPE.name:
                scopes[index] = replace(scope, metrics=[*scope.metrics, metric])
                break
        else:
            scopes.append(ScopeMetrics(scope=_SCOPE, metrics=[metric], schema_url=""))
        return MetricsData(resource_metrics=[replace(first, scope_metrics=scopes), *rest])

    # --- Prometheus ---------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        """prometheus_client collector protocol: `gateway_request_duration_seconds`."""
        from prometheus_client.core import HistogramMetricFamily

        scope = {"otel_scope_name": _SCOPE.name, "otel_scope_schema_url": "", "otel_scope_version": __version__}
        family = HistogramMetricFamily(
            "gateway_request_duration_seconds", DESCRIPTION, labels=[*_LABELS, *scope], unit="seconds"
        )
        for key, series in self.snapshot():
            cumulative, buckets = 0, []
            for bound, count in zip([*map(_float_text, LATENCY_BUCKETS), "+Inf"], series.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([*key, *scope.values()], buckets, series.sum)
        yield family

    def describe(self) -> Sequence[Any]:
        """Nothing to pre-register (the registry then collects on scrape only)."""
        return []


def _float_text(value: float) -> str:
    return repr(float(value))
