"""gateway.v1.Admin through real channels: authentication, every RPC, audit attribution."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.repository import file_sha256
from testkit.gateways import (
    CI_TOKEN,
    MODELS,
    ONCALL_TOKEN,
    RunningGateway,
    config_text,
    own_models,
    rpc_error,
    running_gateway,
)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(model_root=own_models(tmp_path)) as running:
        yield running


def test_authentication(gw: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    request = pb.GetRoutesRequest()
    missing = rpc_error(lambda: gw.admin_stub.GetRoutes(request, timeout=10))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in missing.details()
    wrong = rpc_error(lambda: gw.admin("GetRoutes", request, token="not-a-valid-token-at-all"))
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    basic = rpc_error(
        lambda: gw.admin_stub.GetRoutes(request, metadata=(("authorization", f"Basic {ONCALL_TOKEN}"),), timeout=10)
    )
    assert basic.code() == grpc.StatusCode.UNAUTHENTICATED
    # Mutations are refused the same way and change nothing.
    refused = rpc_error(
        lambda: gw.admin("Rollback", pb.RollbackRequest(endpoint="ctr-ranker", reason="x"), token="nope-nope-nope-nope")
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert gw.gateway.router.table.revision == 1
    assert gw.admin("GetRoutes", request).revision == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert ONCALL_TOKEN not in logged and "not-a-valid-token-at-all" not in logged


def test_changes_are_attributed_to_the_token_name(gw: RunningGateway) -> None:
    response = gw.admin(
        "SetTraffic",
        pb.SetTrafficRequest(endpoint="ctr-ranker", weights={"1.12": 80, "1.13": 20}, reason="ramp"),
        token=CI_TOKEN,
    )
    assert response.revision == 2
    assert [(c.path, c.before, c.after) for c in response.changes] == [
        ("ctr-ranker traffic 1.12", "90", "80"),
        ("ctr-ranker traffic 1.13", "10", "20"),
    ]
    rollback = gw.admin("Rollback", pb.RollbackRequest(endpoint="ctr-ranker", reason="CTR drop"))
    assert rollback.revision == 3
    entries = gw.admin("GetAudit", pb.GetAuditRequest(endpoint="ctr-ranker")).entries
    assert [(e.actor, e.action, e.reason, e.revision_after) for e in entries[:2]] == [
        ("oncall", "rollback", "CTR drop", 3),
        ("ci", "set-traffic", "ramp", 2),
    ]
    assert json.loads(entries[1].detail) == {"weights": {"1.12": 80, "1.13": 20}}


def test_dry_run_and_routes_history(gw: RunningGateway) -> None:
    dry = gw.admin("Switch", pb.SwitchRequest(endpoint="ctr-ranker", version="1.14", reason="try", dry_run=True))
    assert dry.dry_run and dry.revision == 1 and dry.changes
    assert gw.admin("GetRoutes", pb.GetRoutesRequest()).revision == 1
    gw.admin("Switch", pb.SwitchRequest(endpoint="ctr-ranker", version="1.14", reason="blue-green"))
    current = gw.admin("GetRoutes", pb.GetRoutesRequest(endpoint="ctr-ranker"))
    assert current.revision == 2 and dict(current.endpoints[0].traffic) == {"1.14": 100}
    first = gw.admin("GetRoutes", pb.GetRoutesRequest(revision=1))
    assert dict(first.endpoints[0].traffic) == {"1.12": 90, "1.13": 10}
    history = gw.admin("ListRevisions", pb.ListRevisionsRequest(limit=10)).revisions
    assert [r.revision for r in history] == [2, 1]
    # The data plane serves what the routes say.
    assert gw.predict(routing_key="user-1").version == "1.14"
    assert gw.predict(routing_key="user-1").route_revision == 2


def test_versions_load_and_unload(gw: RunningGateway, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(root / "ctr-ranker/1.14", root / "ctr-ranker/1.20")
    digest = file_sha256(root / "ctr-ranker/1.20/model.onnx")
    before = time.time()
    loaded = gw.admin(
        "LoadVersion",
        pb.LoadVersionRequest(
            endpoint="ctr-ranker", version="1.20", path="ctr-ranker/1.20", sha256=digest, reason="new"
        ),
    )
    assert loaded.revision == 2
    versions = {v.version: v for v in gw.admin("ListVersions", pb.ListVersionsRequest(endpoint="ctr-ranker")).versions}
    assert versions["1.20"].state == "ready" and versions["1.20"].sha256 == digest
    assert versions["1.12"].traffic == 90 and list(versions["1.12"].labels) == ["stable"]
    assert versions["1.12"].loaded_at <= before <= versions["1.20"].loaded_at <= time.time()
    assert gw.predict("ctr-ranker@1.20").version == "1.20"
    bad = rpc_error(
        lambda: gw.admin(
            "LoadVersion",
            pb.LoadVersionRequest(
                endpoint="ctr-ranker", version="1.21", path="ctr-ranker/1.20", sha256="c" * 64, reason="x"
            ),
        )
    )
    assert bad.code() == grpc.StatusCode.FAILED_PRECONDITION and "was expected" in bad.details()
    busy = rpc_error(
        lambda: gw.admin("UnloadVersion", pb.UnloadVersionRequest(endpoint="ctr-ranker", version="1.12", reason="x"))
    )
    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
    gw.admin("UnloadVersion", pb.UnloadVersionRequest(endpoint="ctr-ranker", version="1.20", reason="done"))
    gone = rpc_error(lambda: gw.predict("ctr-ranker@1.20"))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("method", "request_", "code", "message"),
    [
        (
            "SetTraffic",
            pb.SetTrafficRequest(endpoint="ctr-ranker", weights={"1.12": 60}, reason="x"),
            "INVALID_ARGUMENT",
            "weights sum to 60",
        ),
        (
            "SetTraffic",
            pb.SetTrafficRequest(endpoint="nope", weights={"1.12": 100}, reason="x"),
            "NOT_FOUND",
            "no endpoint 'nope'",
        ),
        (
            "SetTraffic",
            pb.SetTrafficRequest(endpoint="ctr-ranker", weights={"1.12": 100}),
            "INVALID_ARGUMENT",
            "reason is required",
        ),
        (
            "SetLabel",
            pb.SetLabelRequest(endpoint="ctr-ranker", label="stable", version="7", reason="x"),
            "NOT_FOUND",
            "has no version '7'",
        ),
        (
            "Rollback",
            pb.RollbackRequest(endpoint="ctr-ranker", to_revision=5, reason="x"),
            "INVALID_ARGUMENT",
            "not earlier",
        ),
        ("Apply", pb.ApplyRequest(document="endpoints: {}", reason="x"), "INVALID_ARGUMENT", "endpoints"),
        ("GetRoutes", pb.GetRoutesRequest(revision=42), "NOT_FOUND", "no revision 42"),
        (
            "SetBatching",
            pb.SetBatchingRequest(endpoint="ctr-ranker", reason="x"),
            "INVALID_ARGUMENT",
            "give the batching settings (max_batch_size, max_delay_ms, optional preferred_batch_sizes), or off",
        ),
        (
            "SetBatching",
            pb.SetBatchingRequest(endpoint="ctr-ranker", off=True, batching=pb.Batching(max_batch_size=4), reason="x"),
            "INVALID_ARGUMENT",
            "or off to turn batching off, not both",
        ),
        (
            "SetBatching",
            pb.SetBatchingRequest(
                endpoint="ctr-ranker",
                batching=pb.Batching(max_batch_size=4, max_delay_ms=1, preferred_batch_sizes=[8]),
                reason="x",
            ),
            "INVALID_ARGUMENT",
            "batching: preferred_batch_sizes: Value error, [8]: each must be between 1 and max_batch_size 4",
        ),
        (
            "SetRunner",
            pb.SetRunnerRequest(endpoint="ctr-ranker", runner="gpu", reason="x"),
            "INVALID_ARGUMENT",
            "endpoints.ctr-ranker.runner: 'gpu' is not a runner; valid: auto, inline, pool",
        ),
    ],
)
def test_admin_errors(gw: RunningGateway, method: str, request_: Message, code: str, message: str) -> None:
    err = rpc_error(lambda: gw.admin(method, request_))
    assert err.code() == getattr(grpc.StatusCode, code), err.details()
    assert message in err.details()
    assert gw.gateway.router.table.revision == 1


def test_apply_over_grpc(gw: RunningGateway) -> None:
    document = config_text(traffic='{"1.12": 50, "1.13": 50}').replace(f"model_root: {MODELS}", "model_root: .")
    response = gw.admin("Apply", pb.ApplyRequest(document=document, reason="50/50", source="routes.yaml"))
    assert response.revision == 2
    assert dict(gw.gateway.router.table.endpoint("ctr-ranker").weights) == {"1.12": 50, "1.13": 50}
    again = gw.admin("Apply", pb.ApplyRequest(document=document, reason="again"))
    assert again.revision == 2 and not again.changes and "no change" in again.message


def test_batching_and_runner_changes_are_audited_and_shown(gw: RunningGateway) -> None:
    settings = pb.Batching(max_batch_size=16, max_delay_ms=2, preferred_batch_sizes=[4, 8])
    dry = gw.admin(
        "SetBatching", pb.SetBatchingRequest(endpoint="ctr-ranker", batching=settings, reason="try", dry_run=True)
    )
    assert dry.dry_run and gw.gateway.router.table.endpoint("ctr-ranker").batching is None
    change = gw.admin("SetBatching", pb.SetBatchingRequest(endpoint="ctr-ranker", batching=settings, reason="merge"))
    assert {c.path: c.after for c in change.changes} == {
        "ctr-ranker batching max_batch_size": "16",
        "ctr-ranker batching max_delay_ms": "2.0",
        "ctr-ranker batching preferred_batch_sizes": "[4, 8]",
    }
    batching = gw.gateway.router.table.endpoint("ctr-ranker").batching
    assert batching is not None and batching.preferred_batch_sizes == (4, 8)
    runner = gw.admin("SetRunner", pb.SetRunnerRequest(endpoint="ctr-ranker", runner="pool", reason="heavy"))
    assert [(c.path, c.before, c.after) for c in runner.changes] == [("ctr-ranker runner", '"auto"', '"pool"')]
    (routes,) = gw.admin("GetRoutes", pb.GetRoutesRequest(endpoint="ctr-ranker")).endpoints
    assert (routes.batching.max_batch_size, list(routes.batching.preferred_batch_sizes), routes.runner) == (
        16,
        [4, 8],
        "pool",
    )
    off = gw.admin("SetBatching", pb.SetBatchingRequest(endpoint="ctr-ranker", off=True, reason="back"))
    assert {c.path: c.after for c in off.changes}["ctr-ranker batching max_batch_size"] == ""
    (routes,) = gw.admin("GetRoutes", pb.GetRoutesRequest(endpoint="ctr-ranker")).endpoints
    assert not routes.HasField("batching")
    audit = gw.admin("GetAudit", pb.GetAuditRequest(endpoint="ctr-ranker", limit=4)).entries
    assert [(e.action, e.dry_run) for e in audit] == [
        ("batching", False),
        ("runner", False),
        ("batching", False),
        ("batching", True),
    ]
    assert json.loads(audit[2].detail) == {
        "batching": {"max_batch_size": 16, "max_delay_ms": 2.0, "preferred_batch_sizes": [4, 8]}
    }
