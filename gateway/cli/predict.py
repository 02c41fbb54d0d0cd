"""`gateway predict`: send one prediction and show which version and arm served it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gateway.cli.connect import DEFAULT_TARGET, ENV_TARGET, add_tls_options, inference_target, open_channel
from gateway.cli.output import MISSING, fail, print_json, rpc_failure
from gateway.errors import GatewayError
from gateway.routing import version_sort_key


def register(commands: Any) -> None:
    """Add the `predict` subcommand."""
    predict = commands.add_parser("predict", help="send one prediction and show which version served it")
    predict.add_argument("endpoint", help="endpoint, endpoint@version or endpoint:label")
    predict.add_argument(
        "--features", required=True, help="JSON row, list of rows, or {input: values}; @FILE reads a file"
    )
    predict.add_argument("--routing-key", help="sticky routing key (a user id)")
    predict.add_argument("--request-id", help="your id for the request, echoed back (default: generated)")
    predict.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"the gateway's inference address (default ${ENV_TARGET}, else {DEFAULT_TARGET})",
    )
    predict.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="deadline (default 10)")
    predict.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="send N requests (routing keys KEY-1..KEY-N with --routing-key) and print how they were served",
    )
    predict.add_argument("--json", action="store_true", help="print strict JSON instead of text")
    add_tls_options(predict)
    predict.set_defaults(handler=run)


# --- predict -------------------------------------------------------------------------------


def _read_features(value: str) -> Any:
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    return json.loads(text)


def _repeat(stub: Any, request: Any, args: argparse.Namespace) -> int:
    """Send the request `--repeat` times (routing keys KEY-1..KEY-N); print how they were served.

    Failed requests are counted by status code, not fatal (drills inject failures on purpose);
    the exit status is 1 only when none was served.
    """
    served: dict[tuple[str, str], int] = {}
    errors: dict[str, int] = {}
    key = request.routing_key
    for index in range(1, args.repeat + 1):
        if key:
            request.routing_key = f"{key}-{index}"
        try:
            response = stub.Predict(request, timeout=args.timeout)
        except grpc.RpcError as err:
            code = err.code().name if hasattr(err, "code") else "ERROR"
            errors[code] = errors.get(code, 0) + 1
            continue
        served[(response.version, response.arm)] = served.get((response.version, response.arm), 0) + 1
    ordered = sorted(served.items(), key=lambda item: version_sort_key(item[0][0]))
    if args.json:
        print_json(
            {
                "requests": args.repeat,
                "served": [{"version": v, "arm": arm, "count": n} for (v, arm), n in ordered],
                "errors": dict(sorted(errors.items())),
            }
        )
    else:
        parts = ", ".join(f"{v} ({arm}) {n}" for (v, arm), n in ordered) or MISSING
        failed = "; errors: " + ", ".join(f"{c} {n}" for c, n in sorted(errors.items())) if errors else ""
        print(f"{args.repeat} requests to {request.model}: {parts}{failed}")
    return 0 if served else 1


def _request(channel: grpc.Channel, args: argparse.Namespace, features: Any) -> Any:
    """A PredictRequest with the features shaped by the endpoint's metadata."""
    from gateway.grpc.converters import tensor
    from gateway.pb.gateway.v1 import inference_pb2 as gw
    from gateway.pb.inference import grpc_service_pb2 as oip
    from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
    from gateway.tensors import DataType

    endpoint = args.endpoint.split("@", 1)[0].split(":", 1)[0]
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
        datatype = DataType.parse(spec.datatype, what=f"input {name!r}") if spec else DataType.FP32
        array = np.asarray(values, dtype=datatype.numpy)
        if spec and array.ndim == len(spec.shape) - 1:
            array = array[np.newaxis, ...]  # one row: add the batch dimension
        request.inputs.append(tensor(name, array))
    return request


def run(args: argparse.Namespace) -> int:
    """Send one Predict request and print the served version, arm and outputs."""
    from gateway.grpc.converters import tensor_array
    from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc

    try:
        features = _read_features(args.features)
    except (OSError, json.JSONDecodeError) as err:
        return fail(f"--features: {err}")
    target = inference_target(args)
    with open_channel(target, args) as channel:
        try:
            request = _request(channel, args, features)
            stub = gw_grpc.InferenceStub(channel)
            if args.repeat > 1:
                return _repeat(stub, request, args)
            response = stub.Predict(request, timeout=args.timeout)
        except grpc.RpcError as err:
            return rpc_failure(err, target, ENV_TARGET)
        except (ValueError, TypeError, GatewayError) as err:
            return fail(err.message if isinstance(err, GatewayError) else f"--features: {err}")
    try:
        outputs = {t.name: tensor_array(t).tolist() for t in response.outputs}
    except GatewayError as err:
        return fail(f"the response: {err.message}")
    if args.json:
        print_json(
            {
                "request_id": response.request_id,
                "model": response.model,
                "version": response.version,
                "arm": response.arm,
                "route_revision": response.route_revision,
                "feedback_id": response.feedback_id,
                "trace_id": response.trace_id or None,
                "outputs": outputs,
            }
        )
    else:
        traced = f", trace id: {response.trace_id}" if response.trace_id else ""
        print(f"{response.model} {response.version} (arm: {response.arm}, request id: {response.request_id}{traced})")
        for name, value in outputs.items():
            print(f"  {name}: {value}")
    return 0
