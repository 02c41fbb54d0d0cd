"""SIGTERM under load: in-flight calls finish, new calls are refused with UNAVAILABLE, nothing is CANCELLED.

Two real `gateway serve` processes; clients fail over to the second one when the first answers
UNAVAILABLE (as a client behind a load balancer, or with two targets, does). Before the drain,
the first process's shutdown cancelled the calls gRPC had received but not yet handed over.
"""

from __future__ import annotations

import collections
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.fleet import wait_until
from testkit.gateways import GatewayProcess, bearer, predict_request

CLIENTS = 32


def in_flight(gateway: GatewayProcess, version: str) -> float:
    """The gateway's `gateway_requests_in_flight` for one version of ctr-ranker (0 when absent)."""
    page = urllib.request.urlopen(f"http://{gateway.metrics_target}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "gateway_requests_in_flight" and sample.labels.get("version") == version:
                return sample.value
    return 0.0


@pytest.mark.slow
def test_sigterm_under_load_drops_no_request(tmp_path: Path) -> None:
    first = GatewayProcess(tmp_path / "a.db", "--grace", "10", "--metrics-listen", "127.0.0.1:0")
    second = GatewayProcess(tmp_path / "b.db")
    try:
        with grpc.insecure_channel(first.admin_target) as admin:
            admin_pb2_grpc.AdminStub(admin).SetFault(
                pb.SetFaultRequest(
                    endpoint="ctr-ranker", version="1.14", latency_ms=1500, reason="slow calls in flight"
                ),
                metadata=bearer(),
                timeout=30,
            )
        codes: collections.Counter[str] = collections.Counter()
        served_by = collections.Counter[str]()
        lock = threading.Lock()
        stop = threading.Event()
        request = predict_request()

        def client() -> None:
            targets = [first.target, second.target]
            channels = [grpc.insecure_channel(t) for t in targets]
            stubs = [gw_grpc.InferenceStub(c) for c in channels]
            current = 0
            while not stop.is_set():
                try:
                    stubs[current].Predict(request, timeout=20)
                    outcome = "OK"
                    with lock:
                        served_by[targets[current]] += 1
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNAVAILABLE and current == 0:
                        current = 1  # fail over, and retry this request there
                        with lock:
                            codes["failed over"] += 1
                        continue
                    outcome = err.code().name
                with lock:
                    codes[outcome] += 1
            for channel in channels:
                channel.close()

        slow_results: list[str] = []

        def slow_call() -> None:
            with grpc.insecure_channel(first.target) as channel:
                try:
                    gw_grpc.InferenceStub(channel).Predict(predict_request("ctr-ranker@1.14"), timeout=20)
                    slow_results.append("OK")
                except grpc.RpcError as err:
                    slow_results.append(err.code().name)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        slow = [threading.Thread(target=slow_call) for _ in range(8)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: served_by[first.target] > 0, timeout=30)
        for thread in slow:
            thread.start()
        assert wait_until(lambda: in_flight(first, "1.14") == 8, timeout=30)  # the slow calls are in flight
        first.process.send_signal(__import__("signal").SIGTERM)
        exit_code = first.process.wait(timeout=30)
        assert wait_until(lambda: served_by[second.target] > 0, timeout=30)  # the clients failed over
        stop.set()
        for thread in [*threads, *slow]:
            thread.join(timeout=30)
    finally:
        second.stop()
        if first.process.poll() is None:
            first.kill()
    assert exit_code == 0, first.process.stderr.read() if first.process.stderr else ""
    assert slow_results == ["OK"] * 8
    assert served_by[first.target] > 0 and served_by[second.target] > 0
    assert set(codes) <= {"OK", "failed over"}, codes
