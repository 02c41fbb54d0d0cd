"""SIGKILL in the middle of a stream of admin changes: the store holds whole changes only."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import grpc
import pytest

from gateway.desired import DesiredState, diff
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.state.sqlite import SqliteStore
from testkit.gateways import GatewayProcess, bearer

KILL_AFTER = 20  # acknowledged changes before the kill


@pytest.mark.slow
def test_sigkill_mid_changes_keeps_whole_revisions_with_their_audit(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    gateway = GatewayProcess(db)
    admin = gateway.admin_target
    acknowledged: list[int] = []
    stop, enough = threading.Event(), threading.Event()

    def writer() -> None:
        with grpc.insecure_channel(admin) as channel:
            stub = pb_grpc.AdminStub(channel)
            i = 0
            while not stop.is_set():
                share = (i % 9) * 10 + 5
                request = pb.SetTrafficRequest(
                    endpoint="ctr-ranker", weights={"1.12": 100 - share, "1.13": share}, reason=f"change {i}"
                )
                try:
                    acknowledged.append(stub.SetTraffic(request, metadata=bearer(), timeout=5).revision)
                    if len(acknowledged) >= KILL_AFTER:
                        enough.set()
                except grpc.RpcError:
                    return
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    assert enough.wait(60), f"the writer made {len(acknowledged)} changes in 60 s"
    gateway.kill()  # the writer is still sending: the kill lands among changes in flight
    stop.set()
    thread.join(10)
    assert len(acknowledged) >= KILL_AFTER

    restarted = GatewayProcess(db)
    try:
        with grpc.insecure_channel(restarted.admin_target) as channel:
            routes = pb_grpc.AdminStub(channel).GetRoutes(pb.GetRoutesRequest(), metadata=bearer(), timeout=10)
    finally:
        restarted.stop()
    # Durable: every acknowledged change survived; at most the one in flight was lost or kept whole.
    assert max(acknowledged) <= routes.revision <= max(acknowledged) + 1

    store = SqliteStore(db)
    revisions = sorted(store.revisions(limit=100_000), key=lambda r: r.revision)
    assert [r.revision for r in revisions] == list(range(1, routes.revision + 1))
    audit = [e for e in store.audit(limit=100_000) if not e.dry_run]
    by_revision = {e.revision_after: e for e in audit}
    assert len(by_revision) == len(audit) == routes.revision  # one entry per revision, none without one
    for before, after in itertools.pairwise(revisions):
        entry = by_revision[after.revision]
        assert entry.revision_before == before.revision
        expected = diff(DesiredState.from_json(before.document), DesiredState.from_json(after.document))
        assert entry.changes == [c.to_dict() for c in expected]
    # The restarted gateway serves exactly the newest committed revision.
    newest = DesiredState.from_json(revisions[-1].document).endpoint("ctr-ranker")
    assert dict(routes.endpoints[0].traffic) == dict(newest.weights)
    store.close()
