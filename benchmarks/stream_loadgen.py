"""One caller, one request at a time: unary ModelInfer calls, or the same requests over one ModelStreamInfer.

Usage: python -m benchmarks.stream_loadgen TARGET unary|stream SECONDS [--warmup S]
Prints "measuring" when the measured window starts, then one JSON line like benchmarks.loadgen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc


def request(key: str) -> oip.ModelInferRequest:
    x = np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32)
    message = oip.ModelInferRequest(model_name="ctr-ranker")
    message.inputs.add(name="features", datatype="FP32", shape=[1, 32])
    message.raw_input_contents.append(x.tobytes())
    message.parameters["routing_key"].string_param = key
    return message


async def run(target: str, mode: str, seconds: float, warmup: float) -> None:
    requests = [request(f"user-{i}") for i in range(1000)]
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        measure_from = time.monotonic() + warmup
        deadline = measure_from + seconds
        announced = False

        def tick(started: float) -> None:
            nonlocal announced
            if started >= measure_from:
                if not announced:
                    print("measuring", flush=True)
                    announced = True
                latencies.append(time.monotonic() - started)

        i = 0
        if mode == "unary":
            while (started := time.monotonic()) < deadline:
                try:
                    await stub.ModelInfer(requests[i % len(requests)], timeout=10)
                except grpc.aio.AioRpcError:
                    errors += started >= measure_from
                tick(started)
                i += 1
        else:
            send: asyncio.Queue[oip.ModelInferRequest | None] = asyncio.Queue()

            async def outgoing() -> AsyncIterator[oip.ModelInferRequest]:
                while (item := await send.get()) is not None:
                    yield item

            call = stub.ModelStreamInfer(outgoing())
            while (started := time.monotonic()) < deadline:
                await send.put(requests[i % len(requests)])
                reply = await call.read()
                errors += bool(reply.error_message) and started >= measure_from
                tick(started)
                i += 1
            await send.put(None)
            await call.wait_for_connection()
    lat = np.asarray(latencies) * 1000
    elapsed = seconds
    print(json.dumps({
        "requests": len(latencies), "errors": errors, "seconds": elapsed, "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
    }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("mode", choices=["unary", "stream"])
    parser.add_argument("seconds", type=float)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(run(args.target, args.mode, args.seconds, args.warmup))


if __name__ == "__main__":
    main()
