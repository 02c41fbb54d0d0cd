"""Real gateways for tests and benchmarks: in process on port 0 or as `gateway serve`, and the requests to send them."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

from gateway.app import Gateway
from gateway.auth import AdminTokens
from gateway.desired import parse_route_file
from gateway.grpc.server import AdminServer, InferenceServer, start_admin_server, start_inference_server
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.settings import GatewaySettings, ShadowSettings
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.metrics import Telemetry

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DEMO_CONFIG = MODELS / "gateway.yaml"


class LoopThread:
    """An asyncio loop in a daemon thread, for running the aio server beside sync test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


ONCALL_TOKEN = "oncall-token-0123456789"
CI_TOKEN = "ci-token-0123456789abcdef"
TOKENS = AdminTokens({"oncall": ONCALL_TOKEN, "ci": CI_TOKEN})


def bearer(token: str = ONCALL_TOKEN) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting an admin token."""
    return (("authorization", f"Bearer {token}"),)


class RunningGateway:
    """A started in-process gateway (inference and admin listeners) with channels to it."""

    def __init__(self, gateway: Gateway, server: InferenceServer, admin: AdminServer, loop: LoopThread) -> None:
        self.gateway = gateway
        self.server = server
        self.admin_server = admin
        self.loop = loop
        self.port = server.port
        self.target = f"127.0.0.1:{server.port}"
        self.admin_target = f"127.0.0.1:{admin.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.admin_channel = grpc.insecure_channel(self.admin_target)
        self.predict_stub = gw_grpc.InferenceStub(self.channel)
        self.admin_stub = admin_pb2_grpc.AdminStub(self.admin_channel)

    def predict(self, model: str = "ctr-ranker", **kwargs: Any) -> gw.PredictResponse:
        """One Predict call (`predict_request`'s arguments)."""
        response: gw.PredictResponse = self.predict_stub.Predict(predict_request(model, **kwargs), timeout=10)
        return response

    def admin(self, method: str, request: Message, token: str = ONCALL_TOKEN) -> Any:
        """One admin RPC by name, with an admin token."""
        return getattr(self.admin_stub, method)(request, metadata=bearer(token), timeout=30)


def config_text(**endpoint_overrides: object) -> str:
    """The demo route file with overrides for the ctr-ranker endpoint (YAML flow values)."""
    fields = {
        "versions": '["1.12", "1.13", "1.14"]',
        "traffic": '{"1.12": 90, "1.13": 10}',
        "labels": '{stable: "1.12", canary: "1.13"}',
        "max_batch_size": "256",
    }
    fields.update({k: str(v) for k, v in endpoint_overrides.items()})
    body = "\n".join(f"    {k}: {v}" for k, v in fields.items())
    return f"model_root: {MODELS}\nendpoints:\n  ctr-ranker:\n{body}\n"


def own_models(directory: Path) -> Path:
    """A copy of the bundled ctr-ranker versions under `directory` (tests that load, unload or change files)."""
    root = directory / "models"
    shutil.copytree(MODELS / "ctr-ranker", root / "ctr-ranker")
    return root


def rpc_error(call: Callable[..., object]) -> grpc.RpcError:
    """The gRPC error `call` fails with (the test fails if it does not)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@contextmanager
def running_gateway(
    text: str | None = None,
    *,
    max_message_bytes: int = 4 * 1024 * 1024,
    store_path: Path | None = None,
    model_root: Path | None = None,
    telemetry: Telemetry | None = None,
    shadow_settings: ShadowSettings | None = None,
    server_name: str = "model-gateway",
    settings: dict[str, object] | None = None,
) -> Iterator[RunningGateway]:
    """Start a real gateway (SQLite store, models loaded, gRPC on 127.0.0.1:0) and stop it afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        config = parse_route_file(text or config_text(), base_dir=MODELS)
        if model_root is not None:
            config = config.model_copy(update={"model_root": model_root})
        store = SqliteStore(store_path or Path(scratch) / "gateway.db")
        gateway = Gateway(
            config,
            store,
            settings=GatewaySettings.plain(
                max_message_bytes=max_message_bytes,
                shadow=shadow_settings or ShadowSettings(log_dir=None),
                server_name=server_name,
                **(settings or {}),
            ),
            telemetry=telemetry,
        )
        gateway.start()
        loop = LoopThread()
        server = loop.run(start_inference_server(gateway, "127.0.0.1:0", TOKENS))
        admin = loop.run(start_admin_server(gateway, "127.0.0.1:0", TOKENS))
        running = RunningGateway(gateway, server, admin, loop)
        try:
            yield running
        finally:
            running.channel.close()
            running.admin_channel.close()
            loop.run(server.stop(grace=1))
            loop.run(admin.stop(grace=1))
            loop.close()
            gateway.close()


def features(rows: int = 1, seed: int = 0) -> np.ndarray:
    """Random demo features, [rows, 32] float32."""
    return np.random.default_rng(seed).normal(size=(rows, 32)).astype(np.float32)


def tensor(name: str, array: np.ndarray, datatype: gw.DataType.ValueType = gw.DATA_TYPE_FP32) -> gw.Tensor:
    """A gateway.v1 tensor holding an array's bytes."""
    return gw.Tensor(name=name, datatype=datatype, shape=array.shape, data=array.tobytes())


def predict_request(
    model: str = "ctr-ranker",
    *,
    inputs: list[gw.Tensor] | None = None,
    routing_key: str = "",
    request_id: str = "",
    rows: int = 1,
    output_names: tuple[str, ...] = (),
) -> gw.PredictRequest:
    """A Predict request; by default one row of demo features."""
    if inputs is None:
        inputs = [tensor("features", features(rows))]
    return gw.PredictRequest(
        model=model,
        inputs=inputs,
        routing_key=routing_key,
        request_id=request_id,
        output_names=list(output_names),
    )


def scores(response: gw.PredictResponse) -> np.ndarray:
    """The first output of a response as float32."""
    out = response.outputs[0]
    return np.frombuffer(out.data, dtype="<f4").reshape(out.shape)


class GatewayProcess:
    """`gateway serve` as users run it: a real process on free ports, with the demo route file."""

    def __init__(self, store: Path | str, *extra: str, launcher: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [
                *(launcher or (sys.executable, "-m", "gateway.cli")), "--log-level", "WARNING", "serve",
                "--config", str(DEMO_CONFIG), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--store", store if isinstance(store, str) else f"sqlite:///{store}",
                "--shadow-log-dir", "", *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "GATEWAY_ADMIN_TOKENS": f"oncall={ONCALL_TOKEN}"},
        )  # fmt: skip
        assert self.process.stdout is not None
        self.ready_line = self.process.stdout.readline()
        match = re.search(r"inference on (\S+), admin on ([^\s,]+)", self.ready_line)
        if match is None:
            stderr = self.process.stderr.read() if self.process.stderr and self.process.poll() is not None else ""
            raise AssertionError(f"gateway did not start: {self.ready_line!r} {stderr[-2000:]}")
        self.target, self.admin_target = match.group(1), match.group(2)
        metrics = re.search(r"metrics on (\S+) ", self.ready_line)
        self.metrics_target = metrics.group(1) if metrics else ""

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=15)
