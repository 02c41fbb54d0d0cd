"""`gateway serve --workers 2`: one address, two processes, one store, one scrape, one SIGTERM."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.gateways import GatewayProcess, bearer, predict_request

pytestmark = pytest.mark.slow


def _admin_call(target: str, method: str, request):  # type: ignore[no-untyped-def]
    """One admin call on a fresh connection: SO_REUSEPORT gives each new connection to either worker."""
    with grpc.insecure_channel(target) as channel:
        return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, metadata=bearer(), timeout=30)


def _routes_by_worker(target: str, want: int = 2, attempts: int = 400) -> dict[str, admin_pb.Routes]:
    seen: dict[str, admin_pb.Routes] = {}
    for _ in range(attempts):
        routes = _admin_call(target, "GetRoutes", admin_pb.GetRoutesRequest())
        seen[routes.process] = routes
        if len(seen) == want:
            break
    return seen


def _predict_fresh(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return int(gw_grpc.InferenceStub(channel).Predict(predict_request(), timeout=30).route_revision)


def _worker_pids(supervisor: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(supervisor)], capture_output=True, text=True, check=False)
    return {int(pid) for pid in out.stdout.split()}


def test_two_workers_share_addresses_follow_one_store_and_drain_on_sigterm(tmp_path: Path) -> None:
    gateway = GatewayProcess(
        tmp_path / "state.db", "--workers", "2", "--metrics-listen", "127.0.0.1:0", "--grace", "20"
    )
    try:
        assert "(2 workers; revision 1;" in gateway.ready_line
        pids = _worker_pids(gateway.process.pid)
        assert len(pids) == 2
        workers = _routes_by_worker(gateway.admin_target)
        assert {int(name.rsplit(" ", 1)[1]) for name in workers} == pids  # both answer on the one admin address

        rollback = admin_pb.RollbackRequest(endpoint="ctr-ranker", reason="bad canary")
        assert _admin_call(gateway.admin_target, "Rollback", rollback).revision == 2
        after = _routes_by_worker(gateway.admin_target)
        # Any worker answers: each one serves the rollback, so reads agree whichever answers.
        assert len(after) == 2
        assert {(r.revision, dict(r.endpoints[0].traffic)["1.12"]) for r in after.values()} == {(2, 100)}
        assert {_predict_fresh(gateway.target) for _ in range(40)} == {2}

        page = httpx.get(f"http://{gateway.metrics_target}/metrics", timeout=10).text
        revisions = re.findall(r'^gateway_route_revision\{.*worker="(\d)".*\} (\S+)$', page, re.M)
        assert sorted(revisions) == [("0", "2.0"), ("1", "2.0")]  # one series per worker, none merged away
        served = {
            worker: float(count)
            for worker, count in re.findall(r'^gateway_requests_total\{.*worker="(\d)".*\} (\S+)$', page, re.M)
        }
        assert set(served) == {"0", "1"} and sum(served.values()) >= 40

        # Drain: slow requests in flight on both workers when SIGTERM reaches the supervisor.
        fault = admin_pb.SetFaultRequest(endpoint="ctr-ranker", version="1.12", latency_ms=5000, reason="drain test")
        revision = _admin_call(gateway.admin_target, "SetFault", fault).revision
        assert all(r.revision == revision for r in _routes_by_worker(gateway.admin_target).values())
        results: list[object] = []

        def slow() -> None:
            try:
                results.append(_predict_fresh(gateway.target))
            except grpc.RpcError as err:
                results.append(err.code())

        threads = [threading.Thread(target=slow) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # let them reach the workers; each then waits 5 s inside its worker
        assert gateway.stop() == 0
        for thread in threads:
            thread.join(30)
        assert results == [revision] * 16
        assert _worker_pids(gateway.process.pid) == set()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if gateway.process.poll() is None:
            gateway.kill()


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "state.db", "--workers", "2")
    pids = _worker_pids(gateway.process.pid)
    assert len(pids) == 2
    gateway.kill()  # SIGKILL: the supervisor cannot forward anything
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_must_be_positive(tmp_path: Path) -> None:
    from gateway.cli import main

    assert main(["serve", "--workers", "0", "--store", f"sqlite:///{tmp_path / 'state.db'}"]) == 2
