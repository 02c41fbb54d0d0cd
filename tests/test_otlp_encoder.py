"""The hand-written OTLP span encoding parses as the real ExportTraceServiceRequest."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

from gateway.telemetry.otlp import SpanEncoder
from gateway.telemetry.tracing import SpanRecord


def test_encoding_round_trips_through_the_generated_classes() -> None:
    encoder = SpanEncoder(Resource.create({"service.name": "model-gateway", "deployment": "test"}))
    root = SpanRecord(
        "Predict",
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        parent=0x1122334455667788,
        kind=SpanKind.SERVER,
    )
    root.attributes.update(
        {
            "gateway.endpoint": "ctr-ranker",
            "gateway.route_revision": 42,
            "ok": True,
            "ratio": 0.25,
            "negative": -3,
        }
    )
    root.end_ns = root.start_ns + 1500
    child = SpanRecord("shadow", trace_id=7, span_id=8, parent=0, kind=SpanKind.INTERNAL)
    child.links = ((root.trace_id, root.span_id),)
    child.fail(13, "INTERNAL", "boom")
    child.end_ns = child.start_ns + 10
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(encoder.request([root, child]))

    (resource_spans,) = request.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "model-gateway" and resource["deployment"] == "test"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "gateway"
    first, second = scope_spans.spans
    assert first.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert first.span_id.hex() == "b7ad6b7169203331"
    assert first.parent_span_id.hex() == "1122334455667788"
    assert (first.name, first.kind) == ("Predict", 2)
    assert first.end_time_unix_nano - first.start_time_unix_nano == 1500
    attributes = {kv.key: kv.value for kv in first.attributes}
    assert attributes["gateway.endpoint"].string_value == "ctr-ranker"
    assert attributes["gateway.route_revision"].int_value == 42
    assert attributes["ok"].bool_value is True
    assert attributes["ratio"].double_value == 0.25
    assert attributes["negative"].int_value == -3
    assert first.status.code == 0
    assert second.parent_span_id == b"" and second.kind == 1
    (link,) = second.links
    assert link.trace_id == first.trace_id and link.span_id == first.span_id
    assert (second.status.code, second.status.message) == (2, "INTERNAL: boom")
    assert {kv.key: kv.value.int_value for kv in second.attributes}["rpc.grpc.status_code"] == 13
