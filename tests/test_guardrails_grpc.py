"""Guardrails, rollouts, faults, feedback and incidents through real gRPC and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.telemetry.setup import TelemetrySettings, build_telemetry
from gateway.telemetry.tracing import Sampler
from testkit.gateways import ONCALL_TOKEN, ROOT, RunningGateway, running_gateway


def cli(gw_: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_ADMIN_TARGET": gw_.admin_target, "GATEWAY_ADMIN_TOKEN": ONCALL_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_feedback_joins_outcomes_to_the_serving_arm() -> None:
    with running_gateway() as gw_:
        response = gw_.predict(routing_key="user-1")
        joined = gw_.predict_stub.Feedback(gw.FeedbackRequest(request_id=response.request_id, outcome=1.0), timeout=10)
        assert (joined.joined, joined.model, joined.version, joined.arm) == (
            True,
            "ctr-ranker",
            response.version,
            response.arm,
        )
        again = gw_.predict_stub.Feedback(gw.FeedbackRequest(request_id=response.request_id, outcome=1.0), timeout=10)
        unknown = gw_.predict_stub.Feedback(gw.FeedbackRequest(request_id="nope", outcome=0.0), timeout=10)
        assert not again.joined and not unknown.joined  # late or unknown: counted, not an error
        assert gw_.gateway.feedback.unknown == 2
        with pytest.raises(grpc.RpcError) as err:
            gw_.predict_stub.Feedback(gw.FeedbackRequest(request_id="", outcome=1.0), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fault_is_audited_flagged_in_routes_and_spans_and_adds_latency() -> None:
    exporter = InMemorySpanExporter()
    runtime = build_telemetry(TelemetrySettings(span_exporter=exporter, sampler=Sampler(1.0)))
    with running_gateway(telemetry=runtime.telemetry) as gw_:
        change = gw_.admin(
            "SetFault", pb.SetFaultRequest(endpoint="ctr-ranker", version="1.14", latency_ms=30, reason="drill")
        )
        assert change.revision == 2
        routes = gw_.admin("GetRoutes", pb.GetRoutesRequest(endpoint="ctr-ranker"))
        assert dict(routes.endpoints[0].faults) == {"1.14": "error_rate=0 latency_ms=30"}
        import time

        started = time.perf_counter()
        response = gw_.predict("ctr-ranker@1.14")
        assert time.perf_counter() - started >= 0.03
        runtime.telemetry.spans.flush()  # type: ignore[union-attr]
        attributes = next(
            a for a in (dict(s.attributes or {}) for s in exporter.get_finished_spans())
            if a.get("gateway.request_id") == response.request_id
        )  # fmt: skip
        assert attributes["gateway.fault"] == "error_rate=0,latency_ms=30"
        gw_.admin("SetFault", pb.SetFaultRequest(endpoint="ctr-ranker", version="1.14", error_rate=1.0, reason="drill"))
        with pytest.raises(grpc.RpcError) as err:
            gw_.predict("ctr-ranker@1.14")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "injected fault" in err.value.details()
        gw_.admin("SetFault", pb.SetFaultRequest(endpoint="ctr-ranker", version="1.14", clear=True, reason="done"))
        assert gw_.predict("ctr-ranker@1.14").version == "1.14"
        actions = [e.action for e in gw_.admin("GetAudit", pb.GetAuditRequest(endpoint="ctr-ranker")).entries[:3]]
        assert actions == ["fault", "fault", "fault"]
    runtime.shutdown()


@pytest.mark.slow
def test_guardrails_rollout_and_incidents_over_the_api_and_cli() -> None:
    with running_gateway() as gw_:
        bad = cli(gw_, "admin", "guardrails", "ctr-ranker", "--guardrail", "error_rate > lots for 5m", "--reason", "x")
        assert bad.returncode == 1 and "threshold 'lots' is not a number" in bad.stderr
        ok = cli(
            gw_,
            "admin",
            "guardrails",
            "ctr-ranker",
            "--guardrail",
            "error_rate > 2% for 5m min 20",
            "--reason",
            "playbook",
        )
        assert ok.returncode == 0, ok.stderr
        routes = cli(gw_, "admin", "routes")
        assert "guardrail ctr-ranker: error_rate > 2% for 5m min 20" in routes.stdout
        plan = cli(
            gw_,
            "rollout",
            "start",
            "ctr-ranker",
            "1.14",
            "--steps",
            "10,50,100",
            "--step-duration",
            "1h",
            "--reason",
            "ramp",
            "--dry-run",
            "--json",
        )
        assert plan.returncode == 0, plan.stderr
        assert json.loads(plan.stdout)["status"] == "planned"
        started = cli(
            gw_,
            "rollout",
            "start",
            "ctr-ranker",
            "1.14",
            "--steps",
            "10,50,100",
            "--step-duration",
            "1h",
            "--reason",
            "ramp",
        )
        assert started.returncode == 0, started.stderr
        assert "steps: [10%] -> 50% -> 100%" in started.stdout
        assert dict(gw_.gateway.router.table.endpoint("ctr-ranker").weights) == {"1.12": 90, "1.14": 10}
        status = json.loads(cli(gw_, "rollout", "status", "ctr-ranker", "--json").stdout)
        assert (status["status"], status["share"], status["guardrails"]) == (
            "running",
            10,
            ["error_rate > 2% for 5m min 20"],
        )
        twice = cli(gw_, "rollout", "start", "ctr-ranker", "1.13", "--reason", "x")
        assert twice.returncode == 1 and "already has a running rollout of 1.14" in twice.stderr
        gw_.admin("SetFault", pb.SetFaultRequest(endpoint="ctr-ranker", version="1.14", error_rate=1.0, reason="drill"))
        for i in range(300):
            with contextlib.suppress(grpc.RpcError):
                gw_.predict(routing_key=f"k{i}")
        report = gw_.gateway.guardian.tick()
        (incident,) = report.incidents
        assert dict(gw_.gateway.router.table.endpoint("ctr-ranker").weights) == {"1.12": 100}
        listed = cli(gw_, "incidents", "ctr-ranker")
        assert incident.id in listed.stdout and "rolled back to 1.12" in listed.stdout
        note = cli(gw_, "incidents", "show", incident.id)
        assert (
            note.stdout.startswith(f"# Incident {incident.id}: ctr-ranker 1.14 rollback")
            and "## Follow-ups" in note.stdout
        )
        record = json.loads(cli(gw_, "incidents", "show", incident.id, "--json").stdout)
        assert record["verdicts"][0]["status"] == "breach"
        failed = json.loads(cli(gw_, "rollout", "status", "ctr-ranker", "--json").stdout)
        assert failed["status"] == "failed"
