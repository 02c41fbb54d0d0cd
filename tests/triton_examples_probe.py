"""The calls of Triton's example clients (simple_grpc_*), in their order, against a gateway.

Usage: python triton_examples_probe.py HOST:PORT SCENARIO [ADMIN_TOKEN]

Each scenario makes the tritonclient calls one of the examples makes, in the same order, and
prints what it saw as JSON; tests/test_triton_clients.py judges it. Run in its own process:
tritonclient's copy of the inference.* messages clashes with the gateway's in one pool.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

MODEL = "simple"


def _inputs(module: Any) -> tuple[list[Any], list[Any], np.ndarray, np.ndarray]:
    first = np.arange(16, dtype=np.int32).reshape(1, 16)
    second = np.ones((1, 16), dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(first)
    inputs[1].set_data_from_numpy(second)
    outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]
    return inputs, outputs, first, second


def _checked(result: Any, first: np.ndarray, second: np.ndarray) -> bool:
    return bool(
        np.array_equal(result.as_numpy("OUTPUT0"), first + second)
        and np.array_equal(result.as_numpy("OUTPUT1"), first - second)
    )


def _error(call: Callable[[], Any]) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as err:
        return {"status": str(err.status()), "message": err.message()}
    return {"status": "OK", "message": ""}


def infer(target: str, **client_options: Any) -> dict[str, Any]:
    """simple_grpc_infer_client (and custom_args / keepalive, which only build the client differently)."""
    client = grpcclient.InferenceServerClient(url=target, **client_options)
    inputs, outputs, first, second = _inputs(grpcclient)
    with_outputs = client.infer(model_name=MODEL, inputs=inputs, outputs=outputs, headers={"test": "1"})
    statistics = client.get_inference_statistics(model_name=MODEL, as_json=True)
    without_outputs = client.infer(model_name=MODEL, inputs=inputs, outputs=None)
    return {
        "with_outputs": _checked(with_outputs, first, second),
        "statistics": statistics,
        "without_outputs": _checked(without_outputs, first, second),
    }


def custom_args(target: str) -> dict[str, Any]:
    channel_args = [
        ("grpc.max_send_message_length", 1024 * 1024),
        ("grpc.max_receive_message_length", 1024 * 1024),
        ("grpc.keepalive_time_ms", 2**31 - 1),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", False),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.dns_enable_srv_queries", 1),
    ]
    return infer(target, channel_args=channel_args)


def keepalive(target: str) -> dict[str, Any]:
    options = grpcclient.KeepAliveOptions(
        keepalive_time_ms=2**31 - 1,
        keepalive_timeout_ms=20000,
        keepalive_permit_without_calls=False,
        http2_max_pings_without_data=2,
    )
    return infer(target, keepalive_options=options)


def aio(target: str) -> dict[str, Any]:
    """simple_grpc_aio_infer_client: one infer, statistics, then two infers at once."""

    async def run() -> dict[str, Any]:
        client = aioclient.InferenceServerClient(url=target)
        inputs, outputs, first, second = _inputs(aioclient)
        result = await client.infer(model_name=MODEL, inputs=inputs, outputs=outputs, headers={"test": "1"})
        statistics = await client.get_inference_statistics(model_name=MODEL)
        both = await asyncio.gather(
            client.infer(model_name=MODEL, inputs=inputs, outputs=None),
            client.infer(model_name=MODEL, inputs=inputs, outputs=None),
        )
        await client.close()
        return {
            "first": _checked(result, first, second),
            "model_stats": len(statistics.model_stats),
            "gathered": [_checked(r, first, second) for r in both],
        }

    return asyncio.run(run())


def async_infer(target: str) -> dict[str, Any]:
    """simple_grpc_async_infer_client: a callback-style infer."""
    client = grpcclient.InferenceServerClient(url=target)
    inputs, outputs, first, second = _inputs(grpcclient)
    done: queue.Queue[Any] = queue.Queue()
    client.async_infer(
        model_name=MODEL, inputs=inputs, callback=lambda result, error: done.put(error or result), outputs=outputs
    )
    item = done.get(timeout=10)
    return {"ok": not isinstance(item, InferenceServerException) and _checked(item, first, second)}


def health_metadata(target: str) -> dict[str, Any]:
    """simple_grpc_health_metadata."""
    client = grpcclient.InferenceServerClient(url=target)
    server = client.get_server_metadata()
    metadata = client.get_model_metadata(MODEL, headers={"test": "1", "dummy": "2"})
    return {
        "live": client.is_server_live(headers={"test": "1", "dummy": "2"}),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
        "server_name": server.name,
        "model_name": metadata.name,
        "unknown_model": _error(lambda: client.get_model_metadata("wrong_model_name")),
        "config": client.get_model_config(MODEL, as_json=True)["config"],
    }


def model_control(target: str, token: str = "") -> dict[str, Any]:
    """simple_grpc_model_control, with the admin token as metadata (load/unload are admin operations)."""
    client = grpcclient.InferenceServerClient(url=target)
    headers = {"authorization": f"Bearer {token}"} if token else None
    index = client.get_model_repository_index(as_json=True)
    seen: dict[str, Any] = {"index": index.get("models", [])}
    seen["load"] = _error(lambda: client.load_model(MODEL, headers=headers))
    seen["ready_after_load"] = client.is_model_ready(MODEL)
    bad_config = '"parameters": {"config": {{"max_batch_size": "16"}}}'
    seen["load_bad_config"] = _error(lambda: client.load_model(MODEL, headers=headers, config=bad_config))
    seen["load_config"] = _error(lambda: client.load_model(MODEL, headers=headers, config='{"max_batch_size":"16"}'))
    seen["max_batch_size"] = client.get_model_config(MODEL).config.max_batch_size
    seen["unload"] = _error(lambda: client.unload_model(MODEL, headers=headers))
    seen["ready_after_unload"] = client.is_model_ready(MODEL)
    files = {"file:" + "A" * 256: b"a"}
    seen["load_files"] = _error(lambda: client.load_model(MODEL, headers=headers, config="{}", files=files))
    seen["live"] = client.is_server_live()
    seen["load_unknown"] = _error(lambda: client.load_model("wrong_model_name", headers=headers))
    return seen


def stream(target: str) -> dict[str, Any]:
    """The streaming calls (start_stream, async_stream_infer, stop_stream): a bad request mid-stream."""
    replies: queue.Queue[Any] = queue.Queue()
    inputs, outputs, first, second = _inputs(grpcclient)
    with grpcclient.InferenceServerClient(url=target) as client:
        client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), replies))
        for i in range(3):
            client.async_stream_infer(model_name=MODEL, inputs=inputs, outputs=outputs, request_id=f"r{i}")
        client.async_stream_infer(model_name="wrong_model_name", inputs=inputs, request_id="bad")
        for i in range(3, 5):
            client.async_stream_infer(model_name=MODEL, inputs=inputs, outputs=outputs, request_id=f"r{i}")
        seen: list[object] = []
        deadline = time.time() + 20
        while len(seen) < 6 and time.time() < deadline:
            item = replies.get(timeout=20)
            if isinstance(item, InferenceServerException):
                seen.append({"error": item.message()})
            else:
                seen.append({"id": item.get_response().id, "ok": _checked(item, first, second)})
        client.stop_stream()
    return {"replies": seen}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "infer": infer,
    "custom_args": custom_args,
    "keepalive": keepalive,
    "aio": aio,
    "async_infer": async_infer,
    "health_metadata": health_metadata,
    "model_control": model_control,
    "stream": stream,
}

if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[2]](sys.argv[1], *sys.argv[3:]), default=str))
