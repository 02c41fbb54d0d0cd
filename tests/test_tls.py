"""TLS and mutual TLS on both listeners, certificate reload without dropping connections, admin tokens under TLS.

Throwaway certificate authorities are made with `cryptography` for each test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from gateway.grpc.server import start_admin_server, start_inference_server
from gateway.grpc.tls import ServerTls
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.pb.grpc.reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from testkit.gateways import DEMO_CONFIG, ONCALL_TOKEN, ROOT, TOKENS, bearer, predict_request, running_gateway
from testkit.pki import Authority, secure_channel, write_pems


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = Authority("test CA")
    client_ca = Authority("test client CA")
    files = {"ca": ca.pem, "client_ca": client_ca.pem}
    files["cert"], files["key"] = ca.issue("gateway", server=True)
    files["client_cert"], files["client_key"] = client_ca.issue("ci-pipeline", server=False)
    rotated = Authority("rotated CA")
    files["rotated_ca"] = rotated.pem
    files["rotated_cert"], files["rotated_key"] = rotated.issue("gateway", server=True)
    return write_pems(tmp_path, files)


@contextmanager
def tls_gateway(pki: dict[str, Path], *, mutual: bool) -> Iterator[tuple[str, str, ServerTls]]:
    tls = ServerTls(pki["cert"], pki["key"], pki["client_ca"] if mutual else None)
    with running_gateway() as running:
        server = running.loop.run(start_inference_server(running.gateway, "127.0.0.1:0", tls=tls))
        admin = running.loop.run(start_admin_server(running.gateway, "127.0.0.1:0", TOKENS, tls))
        try:
            yield f"127.0.0.1:{server.port}", f"127.0.0.1:{admin.port}", tls
        finally:
            running.loop.run(server.stop(grace=1))
            running.loop.run(admin.stop(grace=1))


def test_tls_serves_and_admin_still_needs_a_token(pki: dict[str, Path]) -> None:
    with tls_gateway(pki, mutual=False) as (target, admin_target, _):
        with secure_channel(target, pki["ca"]) as secure:
            assert gw_grpc.InferenceStub(secure).Predict(predict_request(), timeout=10).model == "ctr-ranker"
        with grpc.insecure_channel(target) as plaintext, pytest.raises(grpc.RpcError) as err:
            gw_grpc.InferenceStub(plaintext).Predict(predict_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with secure_channel(admin_target, pki["ca"]) as secure:
            stub = admin_pb2_grpc.AdminStub(secure)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetRoutes(pb.GetRoutesRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.GetRoutes(pb.GetRoutesRequest(), metadata=bearer(), timeout=10).revision == 1


def test_mutual_tls_requires_a_client_certificate(pki: dict[str, Path]) -> None:
    with tls_gateway(pki, mutual=True) as (target, admin_target, _):
        with secure_channel(target, pki["ca"], pki["client_cert"], pki["client_key"]) as mutual:
            assert gw_grpc.InferenceStub(mutual).Predict(predict_request(), timeout=10).model == "ctr-ranker"
        with secure_channel(target, pki["ca"]) as anonymous, pytest.raises(grpc.RpcError) as err:
            gw_grpc.InferenceStub(anonymous).Predict(predict_request(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with secure_channel(admin_target, pki["ca"], pki["client_cert"], pki["client_key"]) as mutual:
            stub = admin_pb2_grpc.AdminStub(mutual)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetRoutes(pb.GetRoutesRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # a certificate is not a token


def test_reload_rotates_certificates_without_dropping_open_connections(pki: dict[str, Path]) -> None:
    with tls_gateway(pki, mutual=False) as (target, _, tls):
        old = secure_channel(target, pki["ca"])
        old_stub = gw_grpc.InferenceStub(old)
        assert old_stub.Predict(predict_request(), timeout=10).model == "ctr-ranker"
        pki["cert"].write_bytes(pki["rotated_cert"].read_bytes())
        pki["key"].write_bytes(pki["rotated_key"].read_bytes())
        tls.request_reload()  # what SIGHUP does
        with secure_channel(target, pki["rotated_ca"]) as fresh:
            assert gw_grpc.InferenceStub(fresh).Predict(predict_request(), timeout=10).model == "ctr-ranker"
        assert tls.reloads == 1
        # The connection opened before the rotation still works, call after call.
        for _ in range(5):
            assert old_stub.Predict(predict_request(), timeout=10).model == "ctr-ranker"
        old.close()
        with secure_channel(target, pki["ca"]) as stale, pytest.raises(grpc.RpcError):
            gw_grpc.InferenceStub(stale).Predict(predict_request(), timeout=5)  # new handshakes use the new cert
        # A broken file on the next reload keeps the current certificates.
        pki["key"].write_bytes(b"not a key")
        tls.request_reload()
        with secure_channel(target, pki["rotated_ca"]) as fresh:
            assert gw_grpc.InferenceStub(fresh).Predict(predict_request(), timeout=10).model == "ctr-ranker"
        assert tls.reloads == 1


def test_half_configured_tls_is_refused(pki: dict[str, Path]) -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        ServerTls.from_settings(pki["cert"], None, None)
    with pytest.raises(ConfigError, match="tls_client_ca needs"):
        ServerTls.from_settings(None, None, pki["client_ca"])
    with pytest.raises(ConfigError, match="not a PEM private key"):
        ServerTls(pki["cert"], pki["ca"])
    assert ServerTls.from_settings(None, None, None) is None


def test_admin_reflection_needs_a_token() -> None:
    with running_gateway() as running:
        stub = reflection_pb2_grpc.ServerReflectionStub(running.admin_channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), metadata=bearer("wrong-token-0123456789"), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        answers = list(stub.ServerReflectionInfo(iter([request]), metadata=bearer(), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "gateway.v1.Admin" in names


@pytest.mark.slow
def test_serve_and_cli_over_mutual_tls_with_sighup_reload(pki: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_ADMIN_TOKENS": f"oncall={ONCALL_TOKEN}"}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "serve", "--config", str(DEMO_CONFIG),
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'g.db'}",
            "--shadow-log-dir", "", "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
            "--tls-client-ca", str(pki["client_ca"]),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        match = re.search(r"inference on (\S+), admin on (\S+) ", ready)
        assert match is not None and "TLS" in ready, ready
        tls_flags = [
            "--tls-ca",
            str(pki["ca"]),
            "--tls-cert",
            str(pki["client_cert"]),
            "--tls-key",
            str(pki["client_key"]),
        ]
        cli = [sys.executable, "-m", "gateway.cli"]
        routes = subprocess.run(
            [*cli, "admin", "routes", "--target", match.group(2), "--token", ONCALL_TOKEN, "--json", *tls_flags],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert routes.returncode == 0, routes.stderr
        assert '"revision": 1' in routes.stdout
        row = str([0.1] * 32)
        predicted = subprocess.run(
            [*cli, "predict", "ctr-ranker", "--features", row, "--target", match.group(1), "--json", *tls_flags],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stderr
        process.send_signal(signal.SIGHUP)  # reload: the process keeps serving
        with secure_channel(match.group(1), pki["ca"], pki["client_cert"], pki["client_key"]) as mutual:
            assert gw_grpc.InferenceStub(mutual).Predict(predict_request(), timeout=10).model == "ctr-ranker"
        plaintext = subprocess.run(
            [*cli, "admin", "routes", "--target", match.group(2), "--token", ONCALL_TOKEN],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert plaintext.returncode != 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
