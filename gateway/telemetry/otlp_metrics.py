"""The OTLP metric exporter with the gateway's own request-duration histogram added to each export.

Apart from `durations` so that the OTLP exporter package is imported only when OTLP metrics are on.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from gateway.telemetry.durations import DurationHistogram


class DurationOtlpExporter(OTLPMetricExporter):
    """`OTLPMetricExporter` that adds `gateway.request.duration` (aggregated by the gateway) to each export."""

    def __init__(self, durations: DurationHistogram, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._durations = durations

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        """Export the SDK's metrics with the duration histogram added."""
        result: MetricExportResult = super().export(
            self._durations.added_to(metrics_data), timeout_millis=timeout_millis, **kwargs
        )
        return result
