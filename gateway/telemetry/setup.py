"""Build the telemetry of a gateway process from its settings (`GatewaySettings`).

- Prometheus: `--metrics-listen HOST:PORT` serves `/metrics` (off when not set).
- OTLP over gRPC: `--otlp-endpoint URL` (or `OTEL_EXPORTER_OTLP_ENDPOINT`); traces and metrics
  go there (`OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` turn one off).
- `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (read by the SDK's
  resource detection); the sampler comes from the settings (default: parent-based, always on).
- With no trace exporter, no spans are made at all; with no metric reader, no instruments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from gateway.errors import ConfigError
from gateway.settings import GatewaySettings
from gateway.telemetry.durations import DurationHistogram
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.otlp import OtlpOptions, OtlpSpanSink
from gateway.telemetry.tracing import Sampler, SdkSpanSink, SpanRecorder, SpanSink
from gateway.telemetry.windows import WindowStore

DEFAULT_SERVICE_NAME = "model-gateway"


@dataclass
class TelemetrySettings:
    """What to export where. Tests pass in-memory readers and exporters."""

    metrics_listen: str = ""
    otlp_endpoint: str = ""
    window_horizon_seconds: int = 1800
    metric_readers: list[MetricReader] = field(default_factory=list)
    span_exporter: SpanExporter | None = None
    sampler: Sampler | None = None
    export_traces: bool = True
    export_metrics: bool = True
    otlp: OtlpOptions = field(default_factory=OtlpOptions)

    @classmethod
    def of(cls, settings: GatewaySettings) -> TelemetrySettings:
        """What a gateway process's settings ask for."""
        return cls(
            metrics_listen=settings.metrics_listen,
            otlp_endpoint=settings.otlp_endpoint,
            window_horizon_seconds=settings.window_history,
            sampler=Sampler.named(settings.trace_sampler, settings.trace_sample),
            export_traces=settings.traces_exporter != "none",
            export_metrics=settings.metrics_exporter != "none",
            otlp=OtlpOptions.parse(
                settings.otlp_headers.get_secret_value(),
                settings.otlp_certificate,
                settings.otlp_timeout_ms / 1000,
                settings.otlp_compression == "gzip",
            ),
        )


@dataclass
class TelemetryRuntime:
    """A built telemetry and the servers it runs."""

    telemetry: Telemetry
    prometheus: ThreadingHTTPServer | None = None

    @property
    def metrics_port(self) -> int:
        """The bound Prometheus port (0 when off)."""
        return self.prometheus.server_port if self.prometheus else 0

    def shutdown(self) -> None:
        """Stop the scrape endpoint and flush exporters."""
        if self.prometheus is not None:
            self.prometheus.shutdown()
            self.prometheus.server_close()
        self.telemetry.shutdown()


def _resource() -> Resource:
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource.create({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def _prometheus(listen: str, readers: list[MetricReader], durations: DurationHistogram) -> ThreadingHTTPServer:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--metrics-listen {listen!r}: use HOST:PORT (port 0 picks one)")
    registry = CollectorRegistry()
    readers.append(PrometheusMetricReader(registry=registry))
    registry.register(durations)  # a prometheus_client collector: collect() and describe()
    try:
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    except OSError as err:
        raise ConfigError(f"cannot listen on {listen} for metrics: {err.strerror}") from None
    server_: Any = server
    return server_  # type: ignore[no-any-return]


def build_telemetry(settings: TelemetrySettings) -> TelemetryRuntime:
    """Telemetry as the settings and environment ask for."""
    readers = list(settings.metric_readers)
    durations = DurationHistogram()
    prometheus = _prometheus(settings.metrics_listen, readers, durations) if settings.metrics_listen else None
    endpoint = settings.otlp_endpoint
    resource = _resource()
    sink: SpanSink | None = SdkSpanSink(settings.span_exporter, resource) if settings.span_exporter else None
    if endpoint:
        if settings.export_metrics:
            from gateway.telemetry.otlp_metrics import DurationOtlpExporter

            otlp = settings.otlp
            secure = endpoint.startswith("https://")
            exporter = DurationOtlpExporter(
                durations,
                endpoint=endpoint,
                insecure=not secure,
                credentials=otlp.credentials() if secure else None,
                headers=otlp.headers,
                timeout=otlp.timeout,
                compression=otlp.compression,
            )
            readers.append(PeriodicExportingMetricReader(exporter))
        if sink is None and settings.export_traces:
            sink = OtlpSpanSink(endpoint, resource, settings.otlp)
    meter_provider = MeterProvider(metric_readers=readers, resource=resource) if readers else None
    spans = SpanRecorder(sink, sampler=settings.sampler or Sampler()) if sink else None
    telemetry = Telemetry(
        WindowStore(settings.window_horizon_seconds), meter_provider=meter_provider, spans=spans, durations=durations
    )
    return TelemetryRuntime(telemetry, prometheus)
