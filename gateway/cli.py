"""`gateway` command line: parsing and printing only; the work happens in the core."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gateway import __version__
from gateway.app import Gateway, ServerLimits
from gateway.errors import GatewayError
from gateway.registry import ModelVersion

log = logging.getLogger("gateway")

DEFAULT_CONFIG = "models/gateway.yaml"
DEFAULT_LISTEN = "127.0.0.1:8001"
DEFAULT_TARGET = "localhost:8001"
DEFAULT_STORE = "sqlite:///var/gateway.db"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# --- serve ---------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from gateway.grpc.server import start_inference_server

    gateway = Gateway.from_file(Path(args.config), limits=ServerLimits(args.max_message_bytes))

    def loaded(version: ModelVersion) -> None:
        log.info(
            "%s %s ready (sha256 %s, %.0f ms)",
            version.endpoint,
            version.version,
            version.sha256[:12],
            version.load_seconds * 1000,
        )

    await asyncio.to_thread(gateway.load_models, loaded)
    running = await start_inference_server(gateway, args.listen)
    host = args.listen.rsplit(":", 1)[0]
    summary = "; ".join(
        f"{name} " + ", ".join(f"{v} {w}%" for v, w in routes.weights.items())
        for name, routes in gateway.router.table.endpoints.items()
    )
    print(f"gateway ready: inference on {host}:{running.port} ({summary})", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop(grace=args.grace)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the gateway and serve until SIGINT/SIGTERM."""
    if not args.store.startswith("sqlite:///") and not args.store.startswith("etcd://"):
        return _fail(f"--store {args.store!r}: use sqlite:///PATH or etcd://HOST:PORT")
    try:
        return asyncio.run(_serve(args))
    except GatewayError as err:
        return _fail(err.message)


# --- predict -------------------------------------------------------------------------------


def _read_features(value: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    return json.loads(text)


def cmd_predict(args: argparse.Namespace) -> int:
    """Send one Predict request and print the served version, arm and outputs."""
    from gateway.pb.gateway.v1 import inference_pb2 as gw
    from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
    from gateway.pb.inference import grpc_service_pb2 as oip
    from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
    from gateway.tensors import DataType

    try:
        features = _read_features(args.features)
    except (OSError, json.JSONDecodeError) as err:
        return _fail(f"--features: {err}")
    endpoint = args.endpoint.split("@", 1)[0].split(":", 1)[0]
    with grpc.insecure_channel(args.target) as channel:
        try:
            metadata = oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                oip.ModelMetadataRequest(name=endpoint), timeout=args.timeout
            )
            named = features if isinstance(features, dict) else {metadata.inputs[0].name: features}
            request = gw.PredictRequest(
                model=args.endpoint, routing_key=args.routing_key or "", request_id=args.request_id or ""
            )
            specs = {t.name: t for t in metadata.inputs}
            for name, values in named.items():
                spec = specs.get(name)
                datatype = DataType(spec.datatype) if spec else DataType.FP32
                array = np.asarray(values, dtype=datatype.numpy)
                if spec and array.ndim == len(spec.shape) - 1:
                    array = array[np.newaxis, ...]  # one row: add the batch dimension
                request.inputs.add(
                    name=name,
                    datatype=gw.DataType.Value(f"DATA_TYPE_{datatype.value}"),
                    shape=array.shape,
                    data=array.tobytes(),
                )
            response = gw_grpc.InferenceStub(channel).Predict(request, timeout=args.timeout)
        except grpc.RpcError as err:
            return _fail(f"{err.code().name}: {err.details()}")
        except (ValueError, TypeError) as err:
            return _fail(f"--features: {err}")
    outputs = {
        t.name: np.frombuffer(
            t.data, dtype=DataType(gw.DataType.Name(t.datatype).removeprefix("DATA_TYPE_")).numpy
        )
        .reshape(t.shape)
        .tolist()
        for t in response.outputs
    }
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": response.request_id,
                    "model": response.model,
                    "version": response.version,
                    "arm": response.arm,
                    "route_revision": response.route_revision,
                    "outputs": outputs,
                }
            )
        )
    else:
        print(f"{response.model} {response.version} (arm: {response.arm}, request id: {response.request_id})")
        for name, value in outputs.items():
            print(f"  {name}: {value}")
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="gateway", description="A gRPC model gateway for safe ML releases.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the models of a route file over gRPC")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help=f"route file (default {DEFAULT_CONFIG})")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT for inference; port 0 picks one")
    serve.add_argument("--store", default=DEFAULT_STORE, help="state store URL (sqlite:///PATH)")
    serve.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to finish in-flight calls on stop")
    serve.set_defaults(handler=cmd_serve)

    predict = commands.add_parser("predict", help="send one prediction and show which version served it")
    predict.add_argument("endpoint", help="endpoint, endpoint@version or endpoint:label")
    predict.add_argument(
        "--features", required=True, help="JSON row, list of rows, or {input: values}; @FILE reads a file"
    )
    predict.add_argument("--routing-key", help="sticky routing key (a user id)")
    predict.add_argument("--request-id")
    predict.add_argument("--target", default=DEFAULT_TARGET)
    predict.add_argument("--timeout", type=float, default=10.0)
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(handler=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
