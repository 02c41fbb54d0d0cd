"""Feedback ids: self-describing and signed, counted for the right version by any process; forged and late ones counted as such."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gateway.clock import SimClock
from gateway.feedback import FeedbackIds, FeedbackJoin, Join
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.telemetry.setup import TelemetrySettings, build_telemetry
from gateway.telemetry.windows import SeriesKey, WindowStore
from testkit.gateways import running_gateway
from tests.test_telemetry import points

KEY = b"k" * 32
CANARY = SeriesKey("ctr-ranker", "1.13")


def _joins(clock: SimClock) -> tuple[FeedbackJoin, FeedbackJoin]:
    """Two processes' feedback joins: own windows, one fleet key."""
    serving, other = (
        FeedbackJoin(WindowStore(600, clock=clock), clock=clock),
        FeedbackJoin(WindowStore(600, clock=clock), clock=clock, ttl_seconds=3600),
    )
    serving.sign_with(KEY)
    other.sign_with(KEY)
    return serving, other


def test_an_id_says_what_served_the_request_and_counts_on_another_process() -> None:
    clock = SimClock()
    serving, other = _joins(clock)
    feedback_id = serving.feedback_id(CANARY, "canary")
    assert feedback_id.startswith("f1.") and len(feedback_id) < 100
    assert serving.feedback_id(CANARY, "canary") != feedback_id  # one per request
    clock.advance(600)
    result = other.feedback("", 1.0, feedback_id=feedback_id)
    assert (result.joined, result.result, result.endpoint, result.version, result.arm) == (
        True, Join.JOINED, "ctr-ranker", "1.13", "canary",
    )  # fmt: skip
    assert other._windows.window(CANARY).outcome_totals() == (1, 1.0)
    assert serving._windows.window(CANARY).outcome_totals() == (0, 0.0)  # counted where it arrived
    pinned = FeedbackIds(KEY).read(serving.feedback_id(SeriesKey("ctr-ranker", "1.14", pinned=True), "pinned"))
    assert pinned is not None and pinned.series == SeriesKey("ctr-ranker", "1.14", pinned=True)


def test_forged_and_late_ids_are_counted_and_never_counted_as_outcomes() -> None:
    clock = SimClock()
    serving, other = _joins(clock)
    genuine = serving.feedback_id(CANARY, "canary")
    body = genuine[3:]
    flipped = "f1." + body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    stranger = FeedbackJoin(WindowStore(600, clock=clock), clock=clock)
    stranger.sign_with(b"another gateway's key 0123456789")
    for forged in (flipped, stranger.feedback_id(CANARY, "canary"), "f1.not-base64!", "f1.", "made-up"):
        assert other.feedback("", 1.0, feedback_id=forged).result is Join.FORGED
    clock.advance(3601)
    late = other.feedback("", 1.0, feedback_id=genuine)
    assert (late.joined, late.result) == (False, Join.LATE)
    assert other.counts == {Join.JOINED: 0, Join.UNKNOWN: 0, Join.LATE: 1, Join.FORGED: 5}
    assert other._windows.window(CANARY).outcome_totals() == (0, 0.0)
    assert other.feedback("some-request-id", 1.0).result is Join.UNKNOWN  # a request id it never served


def test_feedback_sent_to_another_gateway_process_counts_for_the_version_that_served() -> None:
    reader = InMemoryMetricReader()
    runtime = build_telemetry(TelemetrySettings(metric_readers=[reader]))
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "shared.db"
        with (
            running_gateway(store_path=store) as a,
            running_gateway(store_path=store, telemetry=runtime.telemetry) as b,
        ):
            served = a.predict(routing_key="user-1")
            assert served.feedback_id
            answer = b.predict_stub.Feedback(
                gw.FeedbackRequest(feedback_id=served.feedback_id, outcome=1.0), timeout=10
            )
            assert (answer.joined, answer.result, answer.version, answer.arm) == (
                True, gw.FEEDBACK_RESULT_JOINED, served.version, served.arm,
            )  # fmt: skip
            series = SeriesKey("ctr-ranker", served.version)
            assert b.gateway.telemetry.windows.window(series).outcome_totals() == (1, 1.0)
            forged = served.feedback_id[:-4] + ("AAAA" if not served.feedback_id.endswith("AAAA") else "BBBB")
            refused = b.predict_stub.Feedback(gw.FeedbackRequest(feedback_id=forged, outcome=1.0), timeout=10)
            assert (refused.joined, refused.result) == (False, gw.FEEDBACK_RESULT_FORGED)
            assert b.gateway.feedback.counts[Join.FORGED] == 1
            counted = {p.attributes["result"]: p.value for p in points(reader, "gateway.feedback")}
            assert counted == {"joined": 1, "forged": 1}
            # The old way still joins on the process that served it.
            local = a.predict_stub.Feedback(gw.FeedbackRequest(request_id=served.request_id, outcome=0.0), timeout=10)
            assert local.result == gw.FEEDBACK_RESULT_JOINED
    runtime.shutdown()


@pytest.mark.parametrize("outcome", [float("nan"), float("inf"), -5.0, 1e300])
def test_an_outcome_with_a_feedback_id_is_checked_like_any_other(outcome: float) -> None:
    clock = SimClock()
    serving, _ = _joins(clock)
    from gateway.errors import InvalidInput

    with pytest.raises(InvalidInput, match="between 0 and 1"):
        serving.feedback("", outcome, feedback_id=serving.feedback_id(CANARY, "canary"))
