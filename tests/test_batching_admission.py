"""Batched and off-loop requests under admission control, and what each request of a batch keeps.

Through a real gateway: a request holds its version's admission slot while it waits for a
batch and while it runs on a runner thread; a deadline that passes while it waits answers it
DEADLINE_EXCEEDED without failing its batch-mates; a caller that leaves is counted as a
timeout of the version and gives its slot back when its run is over (at once when it had not
run). Versions are kept busy and runs observed as in `tests/test_batching.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.pb.gateway.v1 import inference_pb2 as gw_pb
from gateway.shadow.runner import ShadowJob
from gateway.telemetry.drift import DriftBins
from gateway.telemetry.setup import TelemetrySettings, build_telemetry
from gateway.telemetry.tracing import Sampler
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import RunningGateway, config_text, features, running_gateway, scores
from tests.test_batching import WAIT_FOR_FULL, observed_runs, occupy, pending, send, wait_for
from tests.test_grpc_predict import direct

PINNED = SeriesKey("ctr-ranker", "1.12", pinned=True)


def in_flight(running: RunningGateway) -> int:
    return running.gateway.inference.admission.in_flight("ctr-ranker", "1.12")


def test_a_request_holds_its_slot_while_it_waits_for_a_batch_and_while_it_runs_off_the_loop() -> None:
    text = config_text(batching=WAIT_FOR_FULL % 3, runner="pool")
    settings: dict[str, object] = {"runner_threads": 3, "max_concurrent_per_version": 3}
    with (
        running_gateway(text, settings=settings) as gw,
        observed_runs(gw.gateway, "1.12", hold_first=True) as runs,
    ):
        busy = occupy(gw, "1.12", runs)
        assert in_flight(gw) == 1  # held by a run on a runner thread
        waiting = [send(gw, "ctr-ranker@1.12", features(1, seed=i)) for i in range(2)]
        wait_for(lambda: pending(gw) == 2, "two requests to wait for a batch-mate")
        assert in_flight(gw) == 3  # the waiting ones hold theirs
        with pytest.raises(grpc.RpcError) as shed:
            send(gw, "ctr-ranker@1.12", features(1, seed=7)).result()
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_per_version 3" in shed.value.details()
        runs.release.set()
        assert busy.result().version == "1.12"
        wait_for(lambda: in_flight(gw) == 2, "the held run to give its slot back")
        third = send(gw, "ctr-ranker@1.12", features(1, seed=3))  # a slot again: the batch fills and runs
        assert [c.result().version for c in (*waiting, third)] == ["1.12"] * 3
        assert runs.rows == [1, 3]
        wait_for(lambda: in_flight(gw) == 0, "every slot to be given back")


def test_the_endpoint_deadline_answers_a_waiting_request_without_failing_its_batch_mates() -> None:
    # No caller deadline: the endpoint's deadline_ms (1 s) is the request's deadline.
    text = config_text(batching=WAIT_FOR_FULL % 2, runner="pool", deadline_ms=1000)
    with (
        running_gateway(text, settings={"runner_threads": 3}) as gw,
        observed_runs(gw.gateway, "1.12", hold_first=True) as runs,
    ):
        busy = occupy(gw, "1.12", runs)
        late = send(gw, "ctr-ranker@1.12", features(1, seed=1))
        for call in (busy, late):  # the held run and the request waiting behind it
            with pytest.raises(grpc.RpcError) as expired:
                call.result()
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline passed while it waited for its model run" in expired.value.details()
        assert in_flight(gw) == 1  # the held run goes on and keeps its slot; the waiting one gave its back
        window = gw.gateway.telemetry.windows.window(PINNED)
        assert window.stats(600).timeouts == 2
        mates = [send(gw, "ctr-ranker@1.12", features(1, seed=i)) for i in (2, 3)]
        assert [c.result().version for c in mates] == ["1.12", "1.12"]
        assert runs.rows == [1, 2]  # the late request never ran; its would-be batch-mates ran together
        runs.release.set()
        wait_for(lambda: in_flight(gw) == 0, "the held run to end and give its slot back")


def test_a_caller_that_leaves_mid_run_is_a_timeout_and_its_slot_comes_back_when_the_run_ends() -> None:
    with (
        running_gateway(config_text(runner="pool"), settings={"runner_threads": 2}) as gw,
        observed_runs(gw.gateway, "1.12", hold_first=True) as runs,
    ):
        call = send(gw, "ctr-ranker@1.12", features(1, seed=1))
        wait_for(lambda: len(runs) == 1, "the run to start on a runner thread")
        call.cancel()
        window = gw.gateway.telemetry.windows.window(PINNED)
        wait_for(lambda: window.stats(600).timeouts == 1, "the cancelled request to be counted")
        stats = window.stats(600)
        assert (stats.requests, stats.errors) == (1, 0)  # CANCELLED: the caller's doing, a timeout
        assert in_flight(gw) == 1  # the run goes on
        runs.release.set()
        wait_for(lambda: in_flight(gw) == 0, "the slot to come back when the run ends")
        x = features(2, seed=2)
        np.testing.assert_allclose(scores(send(gw, "ctr-ranker@1.12", x).result()), direct("1.12", x), rtol=1e-6)


def test_a_caller_that_leaves_while_waiting_for_a_batch_gives_its_slot_back_at_once() -> None:
    with (
        running_gateway(config_text(batching=WAIT_FOR_FULL % 4, runner="pool"), settings={"runner_threads": 2}) as gw,
        observed_runs(gw.gateway, "1.12", hold_first=True) as runs,
    ):
        occupy(gw, "1.12", runs)
        call = send(gw, "ctr-ranker@1.12", features(1, seed=1))
        wait_for(lambda: pending(gw) == 1, "the request to wait for batch-mates")
        assert in_flight(gw) == 2
        call.cancel()
        wait_for(lambda: pending(gw) == 0, "the request to leave its batch", timeout=5)  # the timer: 10 s
        assert in_flight(gw) == 1  # only the held run; not 10 s later at the batch's timer
        window = gw.gateway.telemetry.windows.window(PINNED)
        wait_for(lambda: window.stats(600).timeouts == 1, "the cancelled request to be counted")
        runs.release.set()


@pytest.fixture
def traced() -> Iterator[tuple[RunningGateway, InMemorySpanExporter, list[ShadowJob]]]:
    """A batching gateway, all traffic weighted to 1.12 with a 100% shadow on 1.14, every request traced."""
    spans = InMemorySpanExporter()
    runtime = build_telemetry(TelemetrySettings(span_exporter=spans, sampler=Sampler(1.0)))
    text = config_text(batching=WAIT_FOR_FULL % 6, runner="pool", traffic='{"1.12": 100}', shadows='{"1.14": 100}')
    try:
        with running_gateway(text, telemetry=runtime.telemetry, settings={"runner_threads": 3}) as gw:
            shadow = gw.gateway.shadow
            offered: list[ShadowJob] = []
            real_offer = shadow.offer

            def offer(job: ShadowJob) -> bool:
                offered.append(job)
                return real_offer(job)

            shadow.offer = offer  # type: ignore[method-assign]
            yield gw, spans, offered
    finally:
        runtime.shutdown()


def test_each_request_of_a_batch_keeps_its_own_id_span_samples_drift_shadow_copy_and_feedback_id(
    traced: tuple[RunningGateway, InMemorySpanExporter, list[ShadowJob]],
) -> None:
    gw, exporter, offered = traced
    drift = gw.gateway.telemetry.drift
    drift.set_references({"ctr-ranker": DriftBins.from_sample(features(64, seed=11), None, "test reference")})
    drift.track(["ctr-ranker"])
    inputs = [features(rows, seed=rows) for rows in (1, 2, 3)]
    with observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
        busy = occupy(gw, "1.12", runs)  # pinned: measured apart from the weighted requests below
        calls = [send(gw, "ctr-ranker", x, routing_key=f"user-{i}") for i, x in enumerate(inputs)]
        responses = [c.result() for c in calls]  # 6 rows: one batch, while the pinned run is held
        runs.release.set()
        busy.result()
    assert runs.rows == [1, 6]
    for x, response in zip(inputs, responses, strict=True):
        assert (response.version, response.arm) == ("1.12", "stable")
        np.testing.assert_allclose(scores(response), direct("1.12", x), rtol=1e-6)
    ids = [r.request_id for r in responses]
    assert len(set(ids)) == 3 and len({r.feedback_id for r in responses}) == 3
    # Spans: one per request, each with its own id and rows, all saying three requests shared the run.
    assert gw.gateway.telemetry.spans is not None
    gw.gateway.telemetry.spans.flush()
    spans: dict[Any, Any] = {
        dict(s.attributes or {})["gateway.request_id"]: s
        for s in exporter.get_finished_spans()
        if s.name == "gateway.v1.Inference/Predict"
    }
    for request_id, x in zip(ids, inputs, strict=True):
        attributes: Any = spans[request_id].attributes
        assert attributes["gateway.batch.requests"] == 3
        assert attributes["gateway.batch_size"] == len(x)
        assert attributes["gateway.routing"] == "sticky"
    # Window samples and drift histograms: the three weighted requests, row by row.
    weighted = gw.gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.12", pinned=False)).stats(600)
    assert (weighted.requests, weighted.rows) == (3, 6)
    histograms = drift.window("ctr-ranker", "1.12", 600)
    assert histograms is not None and histograms.rows == 6
    # Shadow copies: one per request, with that request's own inputs and primary outputs.
    assert [job.request_id for job in offered] == ids
    for job, x, response in zip(offered, inputs, responses, strict=True):
        np.testing.assert_array_equal(job.inputs["features"], x)
        np.testing.assert_allclose(job.primary_outputs["score"].ravel(), scores(response).ravel(), rtol=1e-6)
    # Feedback ids: each joins the version and arm that served its request.
    for response in responses:
        joined = gw.predict_stub.Feedback(
            gw_pb.FeedbackRequest(feedback_id=response.feedback_id, outcome=1.0), timeout=10
        )
        assert joined.joined and (joined.version, joined.arm) == ("1.12", "stable")
    assert gw.gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.12", pinned=False)).stats(600).outcomes == 3


def test_the_span_of_a_request_whose_caller_left_while_it_waited_ends_as_cancelled(
    traced: tuple[RunningGateway, InMemorySpanExporter, list[ShadowJob]],
) -> None:
    gw, exporter, _ = traced
    with observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
        occupy(gw, "1.12", runs)
        call = send(gw, "ctr-ranker", features(1, seed=1), routing_key="leaves")
        wait_for(lambda: pending(gw) == 1, "the request to wait for batch-mates")
        call.cancel()
        wait_for(lambda: pending(gw) == 0, "the request to leave its batch", timeout=5)
        runs.release.set()
    assert gw.gateway.telemetry.spans is not None
    gw.gateway.telemetry.spans.flush()
    finished = [dict(s.attributes or {}) for s in exporter.get_finished_spans()]
    (attributes,) = [a for a in finished if a.get("gateway.routing") == "sticky"]
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
