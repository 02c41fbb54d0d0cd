"""Closed-loop load: N concurrent callers on one grpc.aio channel, each sending batch-1 Predicts.

Usage: python -m benchmarks.loadgen TARGET CONCURRENCY SECONDS [--model M] [--keys]
Prints one JSON line: requests, errors, seconds, latency quantiles in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
import numpy as np

from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc


def request(model: str, key: str) -> gw.PredictRequest:
    x = np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32)
    return gw.PredictRequest(
        model=model,
        routing_key=key,
        inputs=[gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[1, 32], data=x.tobytes())],
    )


async def run(
    target: str, concurrency: int, seconds: float, model: str, keys: bool, warmup: float
) -> dict[str, object]:
    async with grpc.aio.insecure_channel(target) as channel:
        predict = gw_grpc.InferenceStub(channel).Predict
        requests = [request(model, f"user-{i}" if keys else "") for i in range(1000)]
        latencies: list[float] = []
        errors = 0
        measuring = False
        deadline = 0.0

        async def caller(index: int) -> None:
            nonlocal errors
            i = index
            while True:
                started = time.perf_counter()
                if deadline and started >= deadline:
                    return
                try:
                    await predict(requests[i % len(requests)], timeout=10)
                except grpc.aio.AioRpcError:
                    if measuring:
                        errors += 1
                    continue
                finally:
                    i += concurrency
                if measuring:
                    latencies.append(time.perf_counter() - started)

        tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
        await asyncio.sleep(warmup)
        measuring = True
        print("measuring", flush=True)  # the driver samples the server's CPU time now and at the result
        begin = time.perf_counter()
        deadline = begin + seconds
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
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
    parser.add_argument("--model", default="ctr-ranker")
    parser.add_argument("--keys", action="store_true", help="send a routing key per request")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    asyncio.run(run(args.target, args.concurrency, args.seconds, args.model, args.keys, args.warmup))


if __name__ == "__main__":
    main()
