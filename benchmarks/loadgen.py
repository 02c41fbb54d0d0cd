"""Closed-loop load: N concurrent callers on one grpc.aio channel, each sending Predicts (batch 1
by default) for the ctr-ranker endpoint (or `--model`), every request with a routing key.

Usage: python -m benchmarks.loadgen TARGET CONCURRENCY SECONDS [--warmup S] [--channels K] [--model M] [--rows N]

`--channels K` spreads the callers over K connections (as K clients would): with
`gateway serve --workers N` the kernel hands each connection to one worker.
Prints "measuring" when the measured window starts, then one JSON line: requests, errors,
seconds, latency quantiles in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable

import grpc
import numpy as np

from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc

MODEL = "ctr-ranker"

#: Called for each request that completes in the measured window: (started, ended, response), times
#: from time.monotonic (CLOCK_MONOTONIC: comparable across processes on one machine).
Record = Callable[[float, float, gw.PredictResponse], None]


def request(key: str, model: str = MODEL, rows: int = 1) -> gw.PredictRequest:
    x = np.random.default_rng(0).normal(size=(rows, 32)).astype(np.float32)
    return gw.PredictRequest(
        model=model,
        routing_key=key,
        inputs=[gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[rows, 32], data=x.tobytes())],
    )


async def closed_loop(
    target: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    record: Record,
    channels: int = 1,
    requests: list[gw.PredictRequest] | None = None,
) -> tuple[int, float]:
    """Run the callers: `warmup` seconds unrecorded, then print "measuring" and record for `seconds`.

    `requests` (default: batch-1 ctr-ranker requests with 1000 routing keys) are sent in turn.
    Returns the failed calls in the measured window and its length in seconds.
    """
    requests = requests or [request(f"user-{i}") for i in range(1000)]
    # A local subchannel pool per channel: otherwise channels to one target share one connection.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)] if channels > 1 else None)
        for _ in range(channels)
    ]
    try:
        stubs = [gw_grpc.InferenceStub(c).Predict for c in opened]
        return await _callers(stubs, concurrency, seconds, warmup, record, requests)
    finally:
        for channel in opened:
            await channel.close()


async def _callers(
    stubs: list[Callable[..., object]],
    concurrency: int,
    seconds: float,
    warmup: float,
    record: Record,
    requests: list[gw.PredictRequest],
) -> tuple[int, float]:
    """The callers of `closed_loop`, caller i on stub i mod len(stubs)."""
    errors = 0
    measuring = False
    deadline = 0.0

    async def caller(index: int) -> None:
        nonlocal errors
        i = index
        predict = stubs[index % len(stubs)]
        while True:
            started = time.monotonic()
            if deadline and started >= deadline:
                return
            try:
                response = await predict(requests[i % len(requests)], timeout=10)  # type: ignore[misc]
            except grpc.aio.AioRpcError:
                errors += measuring
                continue
            finally:
                i += concurrency
            if measuring:
                record(started, time.monotonic(), response)

    tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    print("measuring", flush=True)  # the driver samples the server's CPU time now and at the result
    begin = time.monotonic()
    deadline = begin + seconds
    await asyncio.gather(*tasks)
    return errors, time.monotonic() - begin


async def run(
    target: str, concurrency: int, seconds: float, warmup: float, channels: int = 1, model: str = MODEL, rows: int = 1
) -> dict[str, float]:
    latencies: list[float] = []
    errors, elapsed = await closed_loop(
        target,
        concurrency,
        seconds,
        warmup,
        lambda started, ended, _: latencies.append(ended - started),
        channels,
        [request(f"user-{i}", model, rows) for i in range(1000)],
    )
    lat = np.asarray(latencies) * 1000
    result = {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--model", default=MODEL, help=f"endpoint to call (default {MODEL})")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    args = parser.parse_args()
    asyncio.run(run(args.target, args.concurrency, args.seconds, args.warmup, args.channels, args.model, args.rows))


if __name__ == "__main__":
    main()
