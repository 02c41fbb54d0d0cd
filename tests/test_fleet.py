"""Many gateway processes, one route state: real processes on a real etcd (and on one SQLite file).

Propagation speed is measured in `benchmarks/fleet.py`; these tests assert what the design
guarantees: every process ends on every change, serving never stops, and a change the store
cannot take fails with UNAVAILABLE naming it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.grpc.health.v1 import health_pb2, health_pb2_grpc
from testkit.etcd import EtcdServer
from testkit.fleet import Member, propagation_seconds, start_members, wait_until
from testkit.gateways import bearer

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_a_change_through_any_of_three_processes_reaches_all(etcd: EtcdServer) -> None:
    with ExitStack() as stack:
        members = start_members(stack, etcd.url(), 3)
        revisions = []
        for change in range(9):
            revision, _seconds = propagation_seconds(members, members[change % 3], canary=11 + change)
            revisions.append(revision)
        assert revisions == list(range(2, 11))  # one seed, then every change its own revision
        assert [m.routes().revision for m in members] == [10, 10, 10]
        assert {m.routes().endpoints[0].traffic["1.13"] for m in members} == {19}
        audit = members[0].admin_stub.GetAudit(
            admin_pb.GetAuditRequest(endpoint="ctr-ranker", limit=20), metadata=bearer(), timeout=10
        )
        assert [e.revision_after for e in audit.entries if e.action == "set-traffic"] == list(range(10, 1, -1))


class Traffic:
    """Predictions against every member in a background thread, counting failures."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for member in self.members:
                try:
                    member.served_revision()
                    self.served += 1
                except grpc.RpcError as err:
                    self.failures.append(f"{member.process.target}: {err.code()} {err.details()}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _disconnected(member: Member) -> bool:
    return not _store_connected(member)


def _store_connected(member: Member) -> bool:
    return member.routes().store.connected


def test_etcd_restart_in_a_stream_of_changes(own_etcd: EtcdServer) -> None:
    url = own_etcd.url("restart")
    with ExitStack() as stack:
        members = start_members(stack, url, 2)
        members += start_members(stack, url, 1, "--metrics-listen", "127.0.0.1:0")
        metrics = f"http://{members[2].process.metrics_target}/metrics"
        with Traffic(members) as traffic:
            for change in range(3):
                propagation_seconds(members, members[change % 3], canary=20 + change)
            own_etcd.kill()
            served_before = traffic.served
            for member in members:
                with pytest.raises(grpc.RpcError) as refused:
                    member.set_traffic(50, reason="while etcd is down")
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"the state store etcd://{own_etcd.endpoint}/restart is unreachable" in refused.value.details()
                assert "keeps serving revision 4" in refused.value.details()
            assert all(wait_until(partial(_disconnected, m)) for m in members)
            routes = members[0].routes()
            assert (routes.revision, routes.store.connected) == (4, False)
            assert routes.store.url == url and routes.store.error
            assert "gateway_store_connected{" in httpx.get(metrics).text
            assert _gauge(httpx.get(metrics).text, "gateway_store_connected") == 0.0
            assert wait_until(lambda: traffic.served > served_before + 30)  # serving goes on without the store
            health = health_pb2_grpc.HealthStub(members[0].channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
            own_etcd.start()
            assert all(wait_until(partial(_store_connected, m)) for m in members)
            assert _gauge(httpx.get(metrics).text, "gateway_store_connected") == 1.0
            for change in range(3):
                propagation_seconds(members, members[(change + 1) % 3], canary=30 + change)
        assert traffic.failures == []
        assert [m.served_revision() for m in members] == [7, 7, 7]


def _gauge(page: str, name: str) -> float:
    lines = [line for line in page.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]
    assert lines, f"{name} not on the page"
    return float(lines[0].rsplit(" ", 1)[1])


def test_a_process_behind_a_compaction_reloads_and_carries_on(etcd: EtcdServer) -> None:
    # Every revision is its own key, so the process's next range finds what it missed whatever
    # was compacted; a watch started from a compacted revision (answered "compacted") is
    # covered by test_etcd_watch_started_before_a_compaction_point_reloads with injected faults.
    with ExitStack() as stack:
        paused, writer = start_members(stack, etcd.url(), 2)
        paused.process.process.send_signal(signal.SIGSTOP)
        try:
            for change in range(4):
                writer.set_traffic(40 + change)
            etcd.compact()
        finally:
            paused.process.process.send_signal(signal.SIGCONT)
        assert wait_until(lambda: paused.served_revision() == 5)
        propagation_seconds([paused, writer], writer, canary=5)
        assert paused.routes().endpoints[0].traffic["1.13"] == 5


def test_processes_sharing_one_sqlite_file_follow_each_other(tmp_path: Path) -> None:
    with ExitStack() as stack:
        members = start_members(stack, tmp_path / "state.db", 3)
        for change in range(6):
            propagation_seconds(members, members[change % 3], canary=11 + change)
        assert [m.served_revision() for m in members] == [7, 7, 7]
