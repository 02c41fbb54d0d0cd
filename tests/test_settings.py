"""One typed settings object: flags over environment over the route file's `server:` section over defaults."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.cli.serve import register
from gateway.errors import ConfigError
from gateway.logs import REQUEST_ID, TRACE_ID, configure_logging
from gateway.settings import GatewaySettings, ShadowSettings, setting_flags
from gateway.telemetry.setup import TelemetrySettings
from testkit.gateways import ROOT, config_text


@pytest.fixture
def route_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    server = "server:\n  guardian_tick: 3\n  grace: 7\n  listen: 127.0.0.1:9001\n  shadow: {workers: 4}\n"
    path.write_text(config_text() + server)
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "OTEL_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_flags_over_environment_over_route_file_over_defaults(route_file: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GATEWAY_GUARDIAN_TICK", "2")
    clean_env.setenv("GATEWAY_SHADOW__QUEUE_SIZE", "16")
    settings = GatewaySettings.load({"config": str(route_file), "grace": "9"})
    assert settings.grace == 9  # flag beats the route file
    assert settings.guardian_tick == 2  # environment beats the route file
    assert settings.listen == "127.0.0.1:9001"  # route file beats the default
    assert settings.shadow.workers == 4 and settings.shadow.queue_size == 16  # nested sources merge
    assert settings.admin_listen == "127.0.0.1:8002"  # the default
    assert settings.shadow.log_dir == Path("var/shadow")


def test_standard_otel_variables_map_onto_the_settings(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    clean_env.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    clean_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    clean_env.setenv("OTEL_METRICS_EXPORTER", "none")
    settings = GatewaySettings.load({"config": "missing.yaml"})
    assert settings.otlp_endpoint == "http://collector:4317"
    assert (settings.trace_sampler, settings.trace_sample, settings.metrics_exporter) == (
        "parentbased_traceidratio",
        0.25,
        "none",
    )
    assert GatewaySettings.load({"config": "missing.yaml", "otlp_endpoint": "http://other:4317"}).otlp_endpoint == (
        "http://other:4317"
    )


def test_otlp_export_options_come_from_the_standard_variables_traces_first(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer general")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "Authorization=Bearer traces, x-tenant=ml")
    clean_env.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ssl/collector-ca.pem")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")
    clean_env.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "GZIP")
    settings = GatewaySettings.load({"config": "missing.yaml"})
    assert "Bearer" not in repr(settings)  # headers carry credentials: never shown
    otlp = TelemetrySettings.of(settings).otlp
    assert otlp.headers == (("authorization", "Bearer traces"), ("x-tenant", "ml"))
    assert (otlp.certificate, otlp.timeout, otlp.compression) == (
        Path("/etc/ssl/collector-ca.pem"),
        2.5,
        grpc.Compression.Gzip,
    )
    flags = GatewaySettings.load({"config": "missing.yaml", "otlp_timeout_ms": 700, "otlp_compression": "none"})
    assert (flags.otlp_timeout_ms, flags.otlp_compression) == (700, "none")


def test_a_bad_value_names_the_setting_and_every_place_it_can_come_from(
    route_file: Path, clean_env: pytest.MonkeyPatch
) -> None:
    route_file.write_text(config_text() + "server:\n  shadow: {workers: 0}\n")
    with pytest.raises(ConfigError) as caught:
        GatewaySettings.load({"config": str(route_file)})
    assert caught.value.message == (
        "setting shadow.workers (--shadow-workers, $GATEWAY_SHADOW__WORKERS, server.shadow.workers in the route "
        "file): Input should be greater than or equal to 1"
    )
    with pytest.raises(ConfigError, match=r"setting colour .*Extra inputs are not permitted"):
        GatewaySettings.load({"config": "missing.yaml", "colour": "blue"})


def test_secrets_have_no_flag_and_every_other_setting_has_one_with_its_docstring() -> None:
    flags = {dotted: flag for flag, dotted, _ in setting_flags()}
    assert "admin_tokens" not in flags and "otlp_headers" not in flags
    for name, info in GatewaySettings.model_fields.items():
        assert info.description, f"{name} has no docstring"
        if name not in {
            "admin_tokens",
            "otlp_headers",
            "traces_exporter",
            "metrics_exporter",
            "trace_sampler",
            "shadow",
        }:
            assert flags[name] == "--" + name.replace("_", "-")
    for name, info in ShadowSettings.model_fields.items():
        assert info.description, f"shadow.{name} has no docstring"
    assert flags["shadow.queue_size"] == "--shadow-queue"
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr,index]
    assert "Seconds between guardrail evaluations" in help_text and "$GATEWAY_GUARDIAN_TICK" in help_text


def test_serve_reads_the_route_files_server_section(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(config_text(model_root=str(ROOT / "models")) + "server:\n  guardian_tick: -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(routes), "--store", f"sqlite:///{tmp_path}/s.db"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "setting guardian_tick (--guardian-tick" in result.stderr and "greater than 0" in result.stderr


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_log_lines_carry_the_request_and_trace_ids(log_buffer: io.StringIO) -> None:
    configure_logging("INFO", "json", stream=log_buffer)

    def serve_a_request() -> None:  # in its own context, as every gRPC call is
        REQUEST_ID.set("req-42")
        TRACE_ID.set("ab" * 16)
        logging.getLogger("logs.test").warning("about %s", "a request")

    contextvars.Context().run(serve_a_request)
    contextvars.Context().run(logging.getLogger("logs.test").info, "not about a request")
    first, second = (json.loads(line) for line in log_buffer.getvalue().splitlines())
    assert (first["message"], first["request_id"], first["trace_id"], first["level"]) == (
        "about a request",
        "req-42",
        "ab" * 16,
        "WARNING",
    )
    assert "request_id" not in second and second["logger"] == "logs.test"


def test_text_log_lines_name_the_request(log_buffer: io.StringIO) -> None:
    configure_logging("INFO", "text", stream=log_buffer)
    token = REQUEST_ID.set("req-7")
    try:
        logging.getLogger("logs.test").error("model failed")
    finally:
        REQUEST_ID.reset(token)
    assert log_buffer.getvalue().rstrip().endswith("logs.test: model failed [request_id=req-7]")


def test_an_unexpected_failure_is_logged_with_its_request_id(
    log_buffer: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc

    from testkit.gateways import running_gateway

    configure_logging("INFO", "json", stream=log_buffer)
    with running_gateway() as gw:
        model = gw.gateway.registry.runnable("ctr-ranker", "1.14")

        def broken(*_args: object) -> object:
            raise RuntimeError("the model blew up")

        monkeypatch.setattr(model, "run", broken)
        with pytest.raises(grpc.RpcError) as caught:
            gw.predict("ctr-ranker@1.14", request_id="req-e2e")
        assert caught.value.code() is grpc.StatusCode.INTERNAL
        assert "blew up" not in (caught.value.details() or "")
    lines = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    failures = [line for line in lines if line["message"].startswith("unexpected error in")]
    assert len(failures) == 1
    assert failures[0]["request_id"] == "req-e2e" and "the model blew up" in failures[0]["exception"]
