"""The new triggers through real gRPC, the CLI and Prometheus: timeouts, Feedback values, rules in words."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.telemetry.setup import TelemetrySettings, build_telemetry
from gateway.telemetry.tracing import Sampler
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import ROOT, config_text, features, predict_request, running_gateway, tensor
from tests.test_guardrails_grpc import cli


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        family.name: [(dict(sample.labels), sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


@pytest.mark.slow
def test_callers_that_time_out_on_a_slow_canary_roll_it_back() -> None:
    runtime = build_telemetry(TelemetrySettings(metrics_listen="127.0.0.1:0"))
    text = config_text(traffic='{"1.12": 50, "1.13": 50}', guardrails='["timeout_rate > 1% for 5m min 20"]')
    with running_gateway(text, telemetry=runtime.telemetry) as gw_:
        # The canary answers 3 s late; its callers wait 1 s (stable's answer easily within it, even on a busy machine).
        gw_.admin(
            "SetFault", pb.SetFaultRequest(endpoint="ctr-ranker", version="1.13", latency_ms=3000, reason="drill")
        )
        routes = gw_.gateway.router.table.endpoint("ctr-ranker")
        keys = [f"user-{i}" for i in range(80)]
        on_canary = sum(routes.choose(key).version == "1.13" for key in keys)
        assert 20 < on_canary < 60
        calls = [(key, gw_.predict_stub.Predict.future(predict_request(routing_key=key), timeout=1.0)) for key in keys]
        for key, call in calls:
            if routes.choose(key).version == "1.13":
                with pytest.raises(grpc.RpcError) as err:
                    call.result()
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                assert call.result().version == "1.12"
        windows = gw_.gateway.telemetry.windows
        canary = windows.window(SeriesKey("ctr-ranker", "1.13")).stats(300)
        for _ in range(50):  # the server sees the callers leave just after they do
            if canary.timeouts == on_canary:
                break
            time.sleep(0.1)
            canary = windows.window(SeriesKey("ctr-ranker", "1.13")).stats(300)
        assert canary.timeouts == canary.requests == on_canary
        assert windows.window(SeriesKey("ctr-ranker", "1.12")).stats(300).timeouts == 0
        (incident,) = gw_.gateway.guardian.tick().incidents
        (verdict,) = incident.verdicts
        assert verdict["metric"] == "timeout_rate" and verdict["observed"] == 1.0
        assert dict(gw_.gateway.router.table.endpoint("ctr-ranker").weights) == {"1.12": 100}
        metrics = scrape(runtime.metrics_port)
        timeouts = {s[0]["version"]: s[1] for s in metrics["gateway_request_timeouts"] if s[0].get("version")}
        assert timeouts["1.13"] == on_canary
        observed = [s for s in metrics["gateway_guardrail_observed"] if s[0]["metric"] == "timeout_rate"]
        assert observed and observed[0][0]["rule"] == "timeout_rate > 1% for 5m min 20" and observed[0][1] == 1.0
        assert metrics["process_memory_usage_bytes"][0][1] > 10_000_000
        # Every series the dashboard and the alert rules read is one the gateway exports.
        row = features()
        row[0, 3] = float("nan")
        served = gw_.predict(routing_key="user-1", inputs=[tensor("features", row)])
        gw_.predict_stub.Feedback(gw.FeedbackRequest(request_id=served.request_id, outcome=1.0, value=3.0), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{runtime.metrics_port}/metrics", timeout=10).read().decode()
        exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
        for path in (ROOT / "deploy/grafana/model-gateway.json", ROOT / "deploy/prometheus/gateway-alerts.yaml"):
            read = set(re.findall(r"\b((?:gateway|process)_[a-z0-9_]+)", path.read_text()))
            assert read and read <= exported, (path.name, sorted(read - exported))
    runtime.shutdown()


def test_feedback_carries_a_business_value_that_reaches_the_window_and_metrics() -> None:
    runtime = build_telemetry(TelemetrySettings(metrics_listen="127.0.0.1:0"))
    with running_gateway(telemetry=runtime.telemetry) as gw_:
        served = [gw_.predict(routing_key=f"user-{i}") for i in range(3)]
        stub = gw_.predict_stub
        stub.Feedback(gw.FeedbackRequest(request_id=served[0].request_id, outcome=1.0, value=12.5), timeout=10)
        stub.Feedback(gw.FeedbackRequest(request_id=served[1].request_id, outcome=1.0, value=0.0), timeout=10)
        stub.Feedback(gw.FeedbackRequest(request_id=served[2].request_id, outcome=0.0), timeout=10)  # no value
        with pytest.raises(grpc.RpcError) as err:
            stub.Feedback(gw.FeedbackRequest(request_id="x", outcome=1.0, value=float("nan")), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "value nan must be a finite number" in (
            err.value.details() or ""
        )
        windows = gw_.gateway.telemetry.windows
        totals = [windows.window(SeriesKey("ctr-ranker", v)).value_totals() for v in {r.version for r in served}]
        assert sum(t.n for t in totals) == 2 and sum(t.total for t in totals) == 12.5
        metrics = scrape(runtime.metrics_port)
        assert sum(s[1] for s in metrics["gateway_feedback_values"]) == 2
        assert sum(s[1] for s in metrics["gateway_feedback_outcomes"]) == 3
        assert sum(s[1] for s in metrics["gateway_feedback_value"]) == 12.5
    runtime.shutdown()


def test_new_rules_through_the_cli_say_what_they_mean() -> None:
    with running_gateway() as gw_:
        rules = [
            "feature_drift[any] > 0.2 psi for 10m",
            "score_drift > 0.1 ks for 10m",
            "value_drop > 3% p < 0.05 for 30m",
            "timeout_rate > 1% for 5m",
            "memory_growth > 200MB for 10m",
        ]
        args = [arg for rule in rules for arg in ("--guardrail", rule)]
        ok = cli(gw_, "admin", "guardrails", "ctr-ranker", *args, "--reason", "the playbooks' triggers")
        assert ok.returncode == 0, ok.stderr
        assert "the guardian reads these rules as:" in ok.stdout
        assert "population stability index above 0.2" in ok.stdout and "attribution by timing" in ok.stdout
        routes = cli(gw_, "admin", "routes")
        for rule in rules:
            assert f"guardrail ctr-ranker: {rule}" in routes.stdout
        bad = cli(
            gw_, "admin", "guardrails", "ctr-ranker", "--guardrail", "feature_drift > 0.2 for 10m", "--reason", "x"
        )
        assert bad.returncode == 1 and "feature_drift names its statistic: write 0.2 psi or 0.2 ks" in bad.stderr
        verdicts = gw_.gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
        assert [v.rule.metric.value for v in verdicts] == [
            "feature_drift",
            "score_drift",
            "value_drop",
            "timeout_rate",
            "memory_growth",
        ]
        assert all(v.status.value == "inconclusive" for v in verdicts)  # no traffic yet: never a pass


def test_a_traced_call_whose_caller_leaves_during_an_injected_delay_ends_its_span_and_counts() -> None:
    exporter = InMemorySpanExporter()
    runtime = build_telemetry(TelemetrySettings(span_exporter=exporter, sampler=Sampler(1.0)))
    with running_gateway(telemetry=runtime.telemetry) as gw_:
        gw_.admin(
            "SetFault", pb.SetFaultRequest(endpoint="ctr-ranker", version="1.14", latency_ms=2000, reason="drill")
        )
        with pytest.raises(grpc.RpcError) as err:
            gw_.predict_stub.Predict(predict_request("ctr-ranker@1.14"), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        window = gw_.gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.14", pinned=True))
        for _ in range(50):
            if window.stats(60).timeouts:
                break
            time.sleep(0.1)
        assert window.stats(60).timeouts == window.stats(60).requests == 1
        spans = []
        for _ in range(50):
            runtime.telemetry.spans.flush()  # type: ignore[union-attr]
            spans = [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("gateway.version") == "1.14"]
            if spans:
                break
            time.sleep(0.1)
        (span,) = spans
        assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        # Admission (gateway/admission.py) answers at once when the injected delay outlasts the deadline;
        # a caller that leaves during a shorter delay is reported as "the caller left before the answer".
        assert "deadline" in (span.status.description or "")
    runtime.shutdown()
