"""Closed-loop load that records every request: start, end (CLOCK_MONOTONIC, comparable across
processes on one machine) and the version that served it.

Usage: python -m benchmarks.recorder TARGET CONCURRENCY SECONDS OUT.npy
Prints "measuring" when the measured window starts, then one JSON line with the totals.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import numpy as np

from benchmarks.loadgen import request
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc

VERSIONS = {"1.12": 0, "1.13": 1, "1.14": 2}


async def run(target: str, concurrency: int, seconds: float, out: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        predict = gw_grpc.InferenceStub(channel).Predict
        requests = [request("ctr-ranker", f"user-{i}") for i in range(1000)]
        records: list[tuple[float, float, int]] = []
        errors = 0
        deadline = 0.0
        measuring = False

        async def caller(index: int) -> None:
            nonlocal errors
            i = index
            while not deadline or time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    response = await predict(requests[i % len(requests)], timeout=10)
                    if measuring:
                        records.append((started, time.monotonic(), VERSIONS.get(response.version, -1)))
                except grpc.aio.AioRpcError:
                    errors += measuring
                i += concurrency

        tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
        await asyncio.sleep(1.0)
        measuring = True
        begin = time.monotonic()
        deadline = begin + seconds
        print("measuring", flush=True)
        await asyncio.gather(*tasks)
        np.save(out, np.asarray(records, dtype=np.float64))
        print(
            json.dumps({"requests": len(records), "errors": errors, "rps": len(records) / (time.monotonic() - begin)}),
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
