"""Limits and deadlines: a per-version concurrency limit that sheds load, deadlines from callers and endpoints."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from gateway.admission import Admission
from gateway.clock import SimClock
from gateway.errors import DeadlineExceeded, Overloaded
from gateway.grpc.errors import RETRY_PUSHBACK_KEY
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.gateways import RunningGateway, config_text, predict_request, running_gateway


def test_the_limit_sheds_with_a_retry_hint_and_frees_on_release() -> None:
    clock = SimClock(100.0)
    admission = Admission(2, clock=clock)
    first = admission.admit("e", "1")
    second = admission.admit("e", "1")
    with pytest.raises(Overloaded) as err:
        admission.admit("e", "1")
    assert err.value.retry_after_seconds is not None and err.value.retry_after_seconds > 0
    assert "max_concurrent_per_version 2" in err.value.message
    admission.admit("e", "2").release()  # other versions have their own limit
    first.release()
    first.release()  # once only
    assert admission.in_flight("e", "1") == 1
    third = admission.admit("e", "1")
    third.hold(5.0)
    third.release()
    second.release()
    assert admission.in_flight("e", "1") == 1  # held for 5 s more
    with pytest.raises(Overloaded):
        admission.admit("e", "1").hold(1)  # admitted (1 of 2)...
        admission.admit("e", "1")  # ...then full
    clock.now += 5.0
    assert admission.in_flight("e", "1") <= 1


def test_the_in_flight_snapshot_counts_every_version_with_held_slots() -> None:
    clock = SimClock(100.0)
    admission = Admission(4, clock=clock)
    running, held = admission.admit("e", "1"), admission.admit("e", "1")
    admission.admit("e", "2")
    held.hold(3.0)
    held.release()
    assert admission.snapshot() == {("e", "1"): 2, ("e", "2"): 1}
    running.release()
    clock.now += 3.0
    assert admission.snapshot() == {("e", "1"): 0, ("e", "2"): 1}


def test_work_past_its_deadline_is_not_started() -> None:
    clock = SimClock(100.0)
    admission = Admission(4, default_deadline=10.0, clock=clock)
    assert admission.deadline(None) == 110.0
    assert admission.deadline(2.0) == 102.0  # the caller's shorter deadline wins
    assert admission.deadline(60.0, endpoint_default=0.5) == 100.5  # the endpoint's default
    deadline = admission.deadline(1.0)
    clock.now += 1.0
    with pytest.raises(DeadlineExceeded, match="not run"):
        admission.admit("e", "1", deadline)
    assert admission.in_flight("e", "1") == 0


@pytest.fixture
def limited() -> Iterator[RunningGateway]:
    text = config_text(deadline_ms=300)
    with running_gateway(text, settings={"max_concurrent_per_version": 4, "default_deadline": 60}) as running:
        yield running


def _fault(gw: RunningGateway, version: str, latency_ms: float) -> None:
    request = pb.SetFaultRequest(endpoint="ctr-ranker", version=version, latency_ms=latency_ms, reason="drill")
    gw.admin("SetFault", request)


def test_a_hung_version_answers_deadline_exceeded_and_sheds_without_starving_others(limited: RunningGateway) -> None:
    _fault(limited, "1.13", 60_000)  # "hung": a minute per request
    codes: Counter[str] = Counter()
    pushback: list[str] = []
    lock = threading.Lock()

    def hung_call() -> None:
        try:
            limited.predict("ctr-ranker@1.13")  # no deadline of its own: the endpoint's 300 ms applies
            outcome = "OK"
        except grpc.RpcError as err:
            outcome = err.code().name
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                pushback.extend(v for k, v in err.trailing_metadata() or () if k == RETRY_PUSHBACK_KEY)
        with lock:
            codes[outcome] += 1

    threads = [threading.Thread(target=hung_call) for _ in range(16)]
    for thread in threads:
        thread.start()
    healthy = [limited.predict("ctr-ranker@1.12").version for _ in range(30)]
    for thread in threads:
        thread.join(30)
    assert healthy == ["1.12"] * 30
    assert set(codes) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    assert codes["DEADLINE_EXCEEDED"] >= 1 and codes["DEADLINE_EXCEEDED"] + codes["RESOURCE_EXHAUSTED"] == 16
    assert limited.gateway.inference.admission.in_flight("ctr-ranker", "1.13") <= 4
    assert len(pushback) == codes["RESOURCE_EXHAUSTED"] and all(int(ms) >= 0 for ms in pushback)


def test_client_deadlines_are_honoured(limited: RunningGateway) -> None:
    _fault(limited, "1.14", 200)
    stub = gw_grpc.InferenceStub(limited.channel)
    # 200 ms of latency fits the endpoint's 300 ms and a 5 s client deadline.
    assert stub.Predict(predict_request("ctr-ranker@1.14"), timeout=5).version == "1.14"
    # A client deadline shorter than the latency: the server answers DEADLINE_EXCEEDED without waiting it out.
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(predict_request("ctr-ranker@1.14"), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_route_file_deadline_must_be_a_positive_integer() -> None:
    from gateway.desired import parse_route_file
    from gateway.errors import ConfigError

    for bad in ("0", "true", "1.5", "-3"):
        with pytest.raises(ConfigError, match="deadline_ms"):
            parse_route_file(config_text(deadline_ms=bad))
