"""Helpers for tests and benchmarks of many gateway processes sharing one store."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import grpc

from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.gateways import GatewayProcess, bearer, predict_request


class Member:
    """One gateway process with a channel to each of its listeners."""

    def __init__(self, process: GatewayProcess) -> None:
        self.process = process
        self.channel = grpc.insecure_channel(process.target)
        self.admin_channel = grpc.insecure_channel(process.admin_target)
        self.predict_stub = gw_grpc.InferenceStub(self.channel)
        self.admin_stub = admin_pb2_grpc.AdminStub(self.admin_channel)

    def served_revision(self) -> int:
        """The route revision that routed a fresh request."""
        return int(self.predict_stub.Predict(predict_request(), timeout=10).route_revision)

    def set_traffic(self, canary: int, reason: str = "fleet test") -> int:
        """Set ctr-ranker to 100-canary / canary through this member; returns the new revision."""
        request = admin_pb.SetTrafficRequest(
            endpoint="ctr-ranker", weights={"1.12": 100 - canary, "1.13": canary}, reason=reason
        )
        return int(self.admin_stub.SetTraffic(request, metadata=bearer(), timeout=30).revision)

    def routes(self) -> admin_pb.Routes:
        """The member's routes as its admin API reports them."""
        routes: admin_pb.Routes = self.admin_stub.GetRoutes(admin_pb.GetRoutesRequest(), metadata=bearer(), timeout=10)
        return routes

    def close(self) -> None:
        """Close the member's channels (the process is stopped apart)."""
        self.channel.close()
        self.admin_channel.close()


def _stop_if_running(process: GatewayProcess) -> None:
    if process.process.poll() is None:
        process.stop()


def start_members(stack: ExitStack, store: Path | str, count: int, *extra: str) -> list[Member]:
    """Start `count` gateway processes on one store; they stop (SIGTERM) when `stack` closes."""
    members = []
    for _ in range(count):
        process = GatewayProcess(store, *extra)
        stack.callback(_stop_if_running, process)
        member = Member(process)
        stack.callback(member.close)
        members.append(member)
    return members


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.002) -> bool:
    """Poll `predicate` until it holds; False when `timeout` passed first (no test asserts on the time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def propagation_seconds(members: list[Member], via: Member, canary: int) -> tuple[int, list[float]]:
    """Change routes through `via`; seconds from the admin call's return until each member served the revision."""
    revision = via.set_traffic(canary)
    returned = time.perf_counter()
    seconds: dict[int, float] = {}
    deadline = returned + 20
    while len(seconds) < len(members) and time.perf_counter() < deadline:
        for index, member in enumerate(members):
            if index not in seconds and member.served_revision() >= revision:
                seconds[index] = time.perf_counter() - returned
    missing = [members[i].process.target for i in range(len(members)) if i not in seconds]
    assert not missing, f"revision {revision} never reached {missing}"
    return revision, [seconds[i] for i in range(len(members))]
