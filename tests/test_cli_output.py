"""CLI conventions: strict JSON, one placeholder, help on every option, quiet closed pipes, useful errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from gateway.cli import build_parser
from gateway.cli.output import MISSING, print_json, shown, table
from gateway.cli.report import _print, report_dict
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from testkit.gateways import ONCALL_TOKEN, ROOT, GatewayProcess, bearer

GATEWAY = [sys.executable, "-m", "gateway.cli"]
ROW = json.dumps([0.1] * 32)


def _parsers(parser: argparse.ArgumentParser, path: str = "gateway") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_and_argument_of_every_command_has_help() -> None:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_the_walk_sees_every_command() -> None:
    paths = {path for path, _ in _parsers(build_parser())}
    assert {"gateway predict", "gateway admin rollback", "gateway batch freeze", "gateway report shadow"} <= paths


def test_print_json_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    print_json({"upper": math.inf, "low": -math.inf, "p50": math.nan, "nested": [{"x": math.nan}, (1.5, 2)]})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"upper": None, "low": None, "p50": None, "nested": [{"x": None}, [1.5, 2]]}


def test_one_placeholder_for_missing_values() -> None:
    assert shown(None) == shown(math.nan) == shown("") == MISSING
    assert shown(0.0, ".2f") == "0.00" and shown(0) == "0"
    assert table(["A", "B"], [[None, math.nan]]).splitlines()[-1].split() == [MISSING, MISSING]


def test_an_empty_shadow_report_shows_no_nan(capsys: pytest.CaptureFixture[str]) -> None:
    nan = math.nan
    empty = pb.ShadowReport(
        endpoint="ctr-ranker",
        shadow_version="1.14",
        percent=100,
        window_seconds=3600,
        agreement_rate=nan,
        agreement_ci_low=nan,
        agreement_ci_high=nan,
        diff=pb.Quantiles(p50=nan, p95=nan, p99=nan, max=nan),
        primary_latency_ms=pb.Quantiles(p50=nan, p95=nan, p99=nan, max=nan),
        shadow_latency_ms=pb.Quantiles(p50=nan, p95=nan, p99=nan, max=nan),
        diff_histogram=[pb.HistogramBucket(upper=math.inf, count=0)],
    )
    _print(report_dict(empty))
    text = capsys.readouterr().out
    assert "nan" not in text.lower() and "inf" not in text.lower()
    print_json(report_dict(empty))
    body = json.loads(capsys.readouterr().out)
    assert body["agreement_rate"] is None and body["diff_histogram"] == [{"upper": None, "count": 0}]


def test_maps_print_in_one_order_whatever_the_wire_order(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.admin import _print_routes

    outputs = []
    for order in (["stable", "canary", "blue"], ["blue", "canary", "stable"]):
        routes = pb.Routes(revision=3)
        endpoint = routes.endpoints.add(name="ctr-ranker", versions=["1.12", "1.13", "1.14"])
        for label, version in zip(order, ["1.12", "1.13", "1.14"], strict=True):
            endpoint.labels[label] = version
        for version in reversed(order):
            endpoint.traffic[{"stable": "1.12", "canary": "1.13", "blue": "1.14"}[version]] = 0
        _print_routes(routes, True)
        outputs.append(json.loads(capsys.readouterr().out)["endpoints"][0])
    assert list(outputs[0]["labels"]) == sorted(outputs[0]["labels"])
    assert list(outputs[1]["labels"]) == sorted(outputs[1]["labels"])
    assert list(outputs[0]["traffic"]) == list(outputs[1]["traffic"]) == ["1.12", "1.13", "1.14"]


# --- against a real gateway process -----------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("store") / "gateway.db")
    yield gateway
    assert gateway.stop() == 0


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [*GATEWAY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**environ, **(env or {})},
        check=False,
    )


def test_predict_reads_its_target_from_the_environment(served: GatewayProcess) -> None:
    result = _run("predict", "ctr-ranker", "--features", ROW, "--json", env={"GATEWAY_TARGET": served.target})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "ctr-ranker"
    refused = _run("predict", "ctr-ranker", "--features", ROW, env={"GATEWAY_TARGET": "127.0.0.1:9"})
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr and "127.0.0.1:9" in refused.stderr


def test_auth_errors_say_how_to_pass_a_token(served: GatewayProcess) -> None:
    env = {"GATEWAY_ADMIN_TARGET": served.admin_target}
    missing = _run("admin", "routes", env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: UNAUTHENTICATED: ")
    assert "--token" in missing.stderr and "GATEWAY_ADMIN_TOKEN" in missing.stderr
    wrong = _run("admin", "routes", "--token", "not-a-token", env=env)
    assert wrong.stderr.startswith("error: PERMISSION_DENIED: ")
    assert "--token" in wrong.stderr and "GATEWAY_ADMIN_TOKENS" in wrong.stderr
    assert len(missing.stderr.strip().splitlines()) == len(wrong.stderr.strip().splitlines()) == 1


def test_a_closed_pipe_exits_quietly(served: GatewayProcess) -> None:
    env = {**os.environ, "GATEWAY_ADMIN_TARGET": served.admin_target, "GATEWAY_ADMIN_TOKEN": ONCALL_TOKEN}
    command = " ".join([*GATEWAY, "admin", "audit", "--json", "--limit", "500"]) + " | head -c 1 >/dev/null"
    with grpc.insecure_channel(served.admin_target) as channel:  # audit entries (dry runs are audited too)
        admin = admin_pb2_grpc.AdminStub(channel)
        label = pb.SetLabelRequest(endpoint="ctr-ranker", label="blue", version="1.14", dry_run=True, reason="x" * 1000)
        for _ in range(80):
            admin.SetLabel(label, metadata=bearer(), timeout=30)
    assert len(_run("admin", "audit", "--json", "--limit", "500", env=env).stdout) > 65536  # beyond a pipe's buffer
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode in (0, 141)


def test_json_output_of_reports_parses_with_a_strict_parser(served: GatewayProcess) -> None:
    env = {"GATEWAY_ADMIN_TARGET": served.admin_target, "GATEWAY_ADMIN_TOKEN": ONCALL_TOKEN}
    shadow = _run("admin", "shadow", "ctr-ranker", "1.14", "--percent", "100", "--reason", "dark launch", env=env)
    assert shadow.returncode == 0, shadow.stderr
    report = _run("report", "shadow", "ctr-ranker", "--json", env=env)
    assert report.returncode == 0, report.stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    body = json.loads(report.stdout, parse_constant=refuse)
    assert body["diff_histogram"][-1]["upper"] is None


def test_runbook_from_the_live_configuration(served: GatewayProcess) -> None:
    env = {"GATEWAY_ADMIN_TARGET": served.admin_target, "GATEWAY_ADMIN_TOKEN": ONCALL_TOKEN}
    rules = ["--guardrail", "error_rate > 2% for 5m min 500", "--guardrail", "latency_p95_ratio > 1.3 for 10m"]
    changed = _run("admin", "guardrails", "ctr-ranker", *rules, "--at-least", "2", "--reason", "runbook", env=env)
    assert changed.returncode == 0, changed.stderr
    screen = _run("runbook", "ctr-ranker", env=env)
    assert screen.returncode == 0, screen.stderr
    assert "TRIGGERS: the guardian acts by itself when at least 2 of these breach" in screen.stdout
    assert "error_rate > 2% for 5m min 500" in screen.stdout and "100% to 1.12 (stable)" in screen.stdout
    page = _run("runbook", "ctr-ranker", "--markdown", env=env)
    assert page.stdout.startswith("# Runbook: ctr-ranker") and "| `latency_p95_ratio > 1.3 for 10m` |" in page.stdout
    body = json.loads(_run("runbook", "ctr-ranker", "--json", env=env).stdout)
    assert [t["rule"] for t in body["triggers"]] == [
        "error_rate > 2% for 5m min 500",
        "latency_p95_ratio > 1.3 for 10m",
    ]
    assert body["at_least"] == 2 and body["rollback"][0]["command"].startswith("gateway admin rollback ctr-ranker")


def test_trace_ids_are_shown_on_success_and_on_failure(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Traced: spans go to an OTLP endpoint nobody listens on (export fails quietly; ids exist).
    traced = GatewayProcess(tmp_path_factory.mktemp("traced") / "gateway.db", "--otlp-endpoint", "http://127.0.0.1:9")
    try:
        env = {"GATEWAY_TARGET": traced.target}
        served = _run("predict", "ctr-ranker", "--features", ROW, env=env)
        assert served.returncode == 0, served.stderr
        assert re.search(r"\(arm: \w+, request id: [0-9a-f]+, trace id: [0-9a-f]{32}\)", served.stdout)
        assert re.fullmatch(r"[0-9a-f]{32}", json.loads(_run("predict", "ctr-ranker", "--features", ROW, "--json",
                                                              env=env).stdout)["trace_id"])  # fmt: skip
        refused = _run("predict", "ctr-ranker@7", "--features", ROW, env=env)
        assert refused.returncode == 1
        assert re.fullmatch(r"error: NOT_FOUND: .* \(trace id [0-9a-f]{32}\)\n", refused.stderr), refused.stderr
    finally:  # no graceful stop: it would retry the span export to the missing collector first
        traced.process.kill()
        traced.process.wait(15)
