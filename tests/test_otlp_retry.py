"""OTLP span export through a collector restart: kept in a bounded buffer, retried, then delivered."""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.otlp import OtlpSpanSink
from gateway.telemetry.tracing import Sampler, SpanRecorder
from tests.test_telemetry import Collector, points


class CollectorProcessStandIn:
    """The in-test collector on a fixed port, stopped and started again like a restarted collector."""

    def __init__(self) -> None:
        self.collector = Collector()
        self.port = 0
        self.server: grpc.Server | None = None

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.collector, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port
        server.start()
        self.server = server

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop(0).wait()
        self.server = None


def wait_for(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def make_spans(recorder: SpanRecorder, count: int, tag: str) -> list[int]:
    ids = []
    for i in range(count):
        span = recorder.start_span("gateway.v1.Inference/Predict", kind=SpanKind.SERVER)
        assert span is not None
        span.attributes["gateway.request_id"] = f"{tag}-{i}"
        recorder.end(span)
        ids.append(span.span_id)
    return ids


@pytest.fixture
def collector() -> Any:
    stand_in = CollectorProcessStandIn()
    stand_in.start()
    yield stand_in
    if stand_in.server is not None:
        stand_in.stop()


def recorder_for(port: int, **options: Any) -> SpanRecorder:
    sink = OtlpSpanSink(f"http://127.0.0.1:{port}", Resource.create({"service.name": "test"}))
    sink._timeout = 1.0  # each try waits at most this long for the collector
    recorder = SpanRecorder(sink, sampler=Sampler(1.0), interval=0.05, max_backoff=0.5, **options)
    recorder.start()
    return recorder


@pytest.mark.slow
def test_spans_made_while_the_collector_is_down_arrive_after_it_returns(collector: Any) -> None:
    recorder = recorder_for(collector.port)
    try:
        before = make_spans(recorder, 20, "before")
        assert wait_for(lambda: len(collector.collector.spans) == 20)
        collector.stop()
        during = make_spans(recorder, 300, "during")
        assert wait_for(lambda: recorder._failing != "")  # tried, failed, kept
        collector.start()  # the same port, as a restarted collector
        after = make_spans(recorder, 20, "after")
        assert wait_for(lambda: len(collector.collector.spans) >= 340)
    finally:
        recorder.shutdown()
    received = [int.from_bytes(s.span_id, "big") for s in collector.collector.spans]
    assert sorted(received) == sorted(before + during + after)  # each exactly once
    assert recorder.dropped == 0


@pytest.mark.slow
def test_what_does_not_fit_is_dropped_counted_and_logged_once_per_interval(
    collector: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = recorder_for(collector.port, max_queue=100, batch_size=10, log_interval=0.2)
    caplog.set_level(logging.WARNING, logger="gateway.telemetry.tracing")
    try:
        collector.stop()
        make_spans(recorder, 10, "first")
        assert wait_for(lambda: recorder._failing != "")  # one batch of 10 held for retry
        made = make_spans(recorder, 1000, "overflow")
        assert recorder.dropped == 900  # the buffer keeps the newest 100; the held batch stays
        reader = InMemoryMetricReader()
        Telemetry(meter_provider=MeterProvider(metric_readers=[reader]), spans=recorder)
        (dropped,) = points(reader, "gateway.spans.dropped")
        assert dropped.value == 900
        assert wait_for(lambda: any("900 spans dropped" in r.getMessage() for r in caplog.records))
        collector.start()
        assert wait_for(lambda: len(collector.collector.spans) == 110)
    finally:
        recorder.shutdown()
    received = {int.from_bytes(s.span_id, "big") for s in collector.collector.spans}
    assert set(made[-100:]) <= received  # the newest survive
    drop_lines = [r for r in caplog.records if "spans dropped" in r.getMessage()]
    assert len(drop_lines) == 1  # one line for the 900, not one per span
    failing_lines = [r for r in caplog.records if "span export failing" in r.getMessage()]
    assert len(failing_lines) == 1
