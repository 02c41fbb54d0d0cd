"""Spans, metrics and their exporters, through a real gateway and real channels."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from gateway.pb.gateway.v1 import admin_pb2 as admin
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.telemetry.otlp import OtlpOptions
from gateway.telemetry.setup import TelemetryRuntime, TelemetrySettings, build_telemetry
from gateway.telemetry.tracing import Sampler
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import RunningGateway, features, predict_request, running_gateway, tensor


@pytest.fixture
def observed() -> Iterator[tuple[RunningGateway, InMemorySpanExporter, InMemoryMetricReader, TelemetryRuntime]]:
    """A fresh gateway and telemetry per test: spans, metric points and routes are each test's own."""
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    runtime = build_telemetry(
        TelemetrySettings(
            metrics_listen="127.0.0.1:0", metric_readers=[reader], span_exporter=spans, sampler=Sampler(1.0)
        )
    )
    try:
        with running_gateway(telemetry=runtime.telemetry) as gw:
            yield gw, spans, reader, runtime
    finally:
        runtime.shutdown()


def finished(gw: RunningGateway, exporter: InMemorySpanExporter) -> list[Any]:
    assert gw.gateway.telemetry.spans is not None
    gw.gateway.telemetry.spans.flush()
    return list(exporter.get_finished_spans())


def points(reader: InMemoryMetricReader, name: str, runtime: TelemetryRuntime | None = None) -> list[Any]:
    """Data points of a metric as a reader collects them (with `runtime`: as its OTLP exporter sends them,
    the gateway's own request-duration histogram added)."""
    data = reader.get_metrics_data()
    assert data is not None
    if runtime is not None:
        data = runtime.telemetry.durations.added_to(data)
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_predict_span_has_routing_attributes_and_its_trace_id_in_the_response(observed) -> None:  # type: ignore[no-untyped-def]
    gw, exporter, _, _ = observed
    exporter.clear()
    response = gw.predict_stub.Predict(predict_request(routing_key="user-5", rows=3), timeout=10)
    (span,) = [s for s in finished(gw, exporter) if s.name == "gateway.v1.Inference/Predict"]
    assert response.trace_id == f"{span.context.trace_id:032x}"
    assert span.kind is SpanKind.SERVER
    attrs = dict(span.attributes)
    assert attrs["gateway.endpoint"] == "ctr-ranker"
    assert attrs["gateway.version"] == response.version
    assert attrs["gateway.arm"] == response.arm
    assert attrs["gateway.routing"] == "sticky"
    assert attrs["gateway.route_revision"] == response.route_revision
    assert attrs["gateway.batch_size"] == 3
    assert attrs["gateway.request_id"] == response.request_id
    assert attrs["rpc.grpc.status_code"] == 0 and attrs["rpc.service"] == "gateway.v1.Inference"
    assert (attrs["rpc.system"], attrs["rpc.method"]) == ("grpc", "Predict")
    assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", gw.port)
    assert attrs["network.peer.address"] == "127.0.0.1" and attrs["network.peer.port"] > 0
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "model-gateway"


def test_refused_call_span_keeps_unset_status_and_its_trace_id(observed) -> None:  # type: ignore[no-untyped-def]
    """A client error is not a server error: the code is recorded, the span status stays UNSET."""
    gw, exporter, _, _ = observed
    exporter.clear()
    with pytest.raises(grpc.RpcError) as err:
        gw.predict(inputs=[tensor("features", features(1)[:, :5])])
    trailer = dict(err.value.trailing_metadata())
    (span,) = finished(gw, exporter)
    assert trailer["trace-id"] == f"{span.context.trace_id:032x}"
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.attributes["gateway.version"] in {"1.12", "1.13"}
    exporter.clear()
    with pytest.raises(grpc.RpcError) as err:
        gw.predict("ctr-ranker@0.9")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    (span,) = finished(gw, exporter)
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_internal_error_message_carries_the_trace_id(observed, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    gw, exporter, _, _ = observed
    model = gw.gateway.registry.runnable("ctr-ranker", "1.14")
    monkeypatch.setattr(model, "_run", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    exporter.clear()
    with pytest.raises(grpc.RpcError) as err:
        gw.predict("ctr-ranker@1.14")
    trace_id = dict(err.value.trailing_metadata())["trace-id"]
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == f"internal error; trace id {trace_id}"
    (span,) = finished(gw, exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "INTERNAL: unexpected error"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]


def test_incoming_traceparent_makes_a_child_span(observed) -> None:  # type: ignore[no-untyped-def]
    gw, exporter, _, _ = observed
    exporter.clear()
    parent_trace, parent_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    request = oip.ModelInferRequest(model_name="ctr-ranker", model_version="1.13")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(features(1).tobytes())
    response = oip_grpc.GRPCInferenceServiceStub(gw.channel).ModelInfer(
        request, metadata=(("traceparent", f"00-{parent_trace}-{parent_span}-01"),), timeout=10
    )
    assert response.parameters["trace_id"].string_param == parent_trace
    (span,) = finished(gw, exporter)
    assert span.name == "inference.GRPCInferenceService/ModelInfer"
    assert f"{span.context.trace_id:032x}" == parent_trace
    assert f"{span.parent.span_id:016x}" == parent_span
    assert span.attributes["gateway.routing"] == "pinned"


def test_unsampled_requests_make_no_span_and_no_trailer() -> None:
    exporter = InMemorySpanExporter()
    runtime = build_telemetry(TelemetrySettings(span_exporter=exporter, sampler=Sampler(0.0)))
    with running_gateway(telemetry=runtime.telemetry) as gw:
        response, call = gw.predict_stub.Predict.with_call(predict_request(), timeout=10)
        assert "trace-id" not in dict(call.trailing_metadata()) and response.trace_id == ""
        runtime.telemetry.spans.flush()  # type: ignore[union-attr]
        assert exporter.get_finished_spans() == ()
    runtime.shutdown()


def test_metrics_per_version_with_errors_at_zero(observed) -> None:  # type: ignore[no-untyped-def]
    gw, _, reader, runtime = observed
    served = Counter(gw.predict(routing_key=f"metrics-{key}").version for key in range(40))
    assert served["1.12"] and served["1.13"]  # these keys reach both arms
    gw.predict("ctr-ranker@1.14")
    errors = {
        (p.attributes["version"], p.attributes["arm"], p.attributes["code"]): p.value
        for p in points(reader, "gateway.request.errors")
    }
    assert errors[("1.14", "1.14", "INTERNAL")] == 0  # present before any error
    assert errors[("1.13", "canary", "UNAVAILABLE")] == 0
    durations = {
        (p.attributes["version"], p.attributes["arm"], p.attributes["code"]): p
        for p in points(reader, "gateway.request.duration", runtime)
    }
    stable = durations[("1.12", "stable", "OK")]
    assert stable.count == served["1.12"] and stable.sum > 0
    assert list(stable.explicit_bounds)[:3] == [0.0001, 0.00025, 0.0005]
    assert sum(stable.bucket_counts) == stable.count and len(stable.bucket_counts) == len(stable.explicit_bounds) + 1
    assert durations[("1.14", "pinned", "OK")].count >= 1
    requests = {
        (p.attributes["version"], p.attributes["code"]): p.value
        for p in points(reader, "gateway.requests")
        if p.attributes["arm"] != "pinned"
    }
    assert requests == {("1.12", "OK"): served["1.12"], ("1.13", "OK"): served["1.13"]}
    (revision,) = points(reader, "gateway.route.revision")
    assert revision.value == gw.gateway.router.table.revision


def test_admin_changes_and_rollbacks_are_counted(observed) -> None:  # type: ignore[no-untyped-def]
    gw, _, reader, _ = observed
    gw.admin(
        "SetTraffic",
        admin.SetTrafficRequest(endpoint="ctr-ranker", weights={"1.12": 80, "1.13": 20}, reason="ramp"),
    )
    gw.admin("Rollback", admin.RollbackRequest(endpoint="ctr-ranker", reason="CTR drop"))
    changes = {
        (p.attributes["action"], p.attributes["trigger"]): p.value for p in points(reader, "gateway.admin.changes")
    }
    assert changes[("set-traffic", "manual")] >= 1 and changes[("rollback", "manual")] >= 1
    rollbacks = {p.attributes["endpoint"]: p.value for p in points(reader, "gateway.rollbacks")}
    assert rollbacks["ctr-ranker"] >= 1
    traffic = {p.attributes["version"]: p.value for p in points(reader, "gateway.version.traffic")}
    assert traffic["1.12"] == 100 and traffic["1.13"] == 0
    loads = points(reader, "gateway.model.load.duration")
    assert {p.attributes["version"] for p in loads} == {"1.12", "1.13", "1.14"}


def test_prometheus_endpoint_scraped_and_parsed(observed) -> None:  # type: ignore[no-untyped-def]
    gw, _, _, runtime = observed
    gw.predict("ctr-ranker@1.13")
    gw.admin("Rollback", admin.RollbackRequest(endpoint="ctr-ranker", reason="scrape a rollback"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{runtime.metrics_port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["gateway_requests"]
    pinned = [
        s
        for s in requests.samples
        if s.labels.get("version") == "1.13" and s.labels.get("arm") == "pinned" and s.labels.get("code") == "OK"
    ]
    assert pinned and pinned[0].value >= 1
    errors = families["gateway_request_errors"]
    assert any(s.labels.get("version") == "1.14" and s.value == 0 for s in errors.samples)
    histogram = families["gateway_request_duration_seconds"]
    assert any(s.name.endswith("_bucket") and s.labels.get("le") == "0.001" for s in histogram.samples)
    pinned_13 = {
        s.name.rpartition("_")[2] + s.labels.get("le", ""): s.value
        for s in histogram.samples
        if s.labels.get("version") == "1.13" and s.labels.get("arm") == "pinned" and s.labels.get("code") == "OK"
    }
    assert pinned_13["bucket+Inf"] == pinned_13["count"] == pinned[0].value
    assert pinned_13["sum"] > 0
    scope = next(s for s in histogram.samples if s.labels.get("version") == "1.13")
    assert scope.labels["otel_scope_name"] == "gateway"  # the labels the OTel exporter gives its metrics
    assert "gateway_route_revision" in families
    rollbacks = [s for s in families["gateway_rollbacks"].samples if s.name == "gateway_rollbacks_total"]
    assert [(s.labels["endpoint"], s.value) for s in rollbacks] == [("ctr-ranker", 1.0)]


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A small OTLP/gRPC collector built from opentelemetry-proto's generated services."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.metric_names: set[str] = set()
        self.durations = 0
        self.received = threading.Event()
        self.metadata: dict[str, dict[str, str]] = {}  # the last export's metadata, by "traces" / "metrics"

    def Export(self, request: Any, context: Any) -> Any:
        kind = "traces" if isinstance(request, trace_service_pb2.ExportTraceServiceRequest) else "metrics"
        self.metadata[kind] = dict(context.invocation_metadata())
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
            self.received.set()
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                self.metric_names.update(m.name for m in scope.metrics)
                for metric in scope.metrics:
                    if metric.name == "gateway.request.duration":
                        count = sum(p.count for p in metric.histogram.data_points)
                        self.durations = max(self.durations, count)  # cumulative: the latest export has all
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.mark.slow
def test_otlp_export_to_a_collector() -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otlp = OtlpOptions.parse("Authorization=Bearer t0ken, X-Tenant=ml", None, 10.0, gzip=True)
    settings = TelemetrySettings(otlp_endpoint=f"http://127.0.0.1:{port}", sampler=Sampler(1.0), otlp=otlp)
    runtime = build_telemetry(settings)
    try:
        with running_gateway(telemetry=runtime.telemetry) as gw:
            for i in range(5):
                gw.predict(routing_key=f"otlp-{i}")
            runtime.telemetry.spans.flush()  # type: ignore[union-attr]
            assert collector.received.wait(60)
        runtime.shutdown()  # flushes the periodic metric reader
        deadline = time.time() + 60  # a bound on waiting, not a timing assertion
        while "gateway.request.duration" not in collector.metric_names and time.time() < deadline:
            time.sleep(0.1)
    finally:
        server.stop(0)
    names = {s.name for s in collector.spans}
    assert names == {"gateway.v1.Inference/Predict"} and len(collector.spans) == 5
    attributes = {kv.key: kv.value for kv in collector.spans[0].attributes}
    assert attributes["gateway.endpoint"].string_value == "ctr-ranker"
    assert {
        "gateway.request.duration",
        "gateway.requests",
        "gateway.request.errors",
    } <= collector.metric_names
    for kind in ("traces", "metrics"):  # the configured headers reach the collector with both (gzip on)
        metadata = collector.metadata[kind]
        assert (metadata["authorization"], metadata["x-tenant"]) == ("Bearer t0ken", "ml"), kind
    assert collector.durations == 5


def test_nan_inputs_feed_null_counters_and_windows(observed) -> None:  # type: ignore[no-untyped-def]
    gw, _, reader, runtime = observed
    x = features(4)
    x[0, 5] = np.nan
    x[2, 5] = np.nan
    x[3, 31] = np.nan
    gw.predict("ctr-ranker@1.14", inputs=[tensor("features", x)])
    nulls = {
        p.attributes["feature"]: p.value
        for p in points(reader, "gateway.input.nulls")
        if p.attributes["version"] == "1.14"
    }
    assert nulls == {"features[5]": 2, "features[31]": 1}
    rows = {(p.attributes["version"], p.attributes["arm"]): p.value for p in points(reader, "gateway.input.rows")}
    assert rows[("1.14", "pinned")] >= 4
    window = gw.gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.14", pinned=True)).stats(60)
    assert window.nan_counts[5] == 2 and window.nan_counts[31] == 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{runtime.metrics_port}/metrics", timeout=10).read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "gateway_input_nulls",
        "gateway_input_rows",
        "gateway_version_traffic_percent",
    } <= names
