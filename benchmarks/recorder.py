"""Closed-loop load (benchmarks.loadgen's loop) that records every request: start, end
(CLOCK_MONOTONIC, comparable across processes on one machine) and the version that served it.

Usage: python -m benchmarks.recorder TARGET CONCURRENCY SECONDS OUT.npy
Prints "measuring" when the measured window starts, then one JSON line with the totals.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np

from benchmarks.loadgen import closed_loop
from gateway.pb.gateway.v1 import inference_pb2 as gw

VERSIONS = {"1.12": 0, "1.13": 1, "1.14": 2}


async def run(target: str, concurrency: int, seconds: float, out: str) -> None:
    records: list[tuple[float, float, int]] = []

    def record(started: float, ended: float, response: gw.PredictResponse) -> None:
        records.append((started, ended, VERSIONS.get(response.version, -1)))

    errors, elapsed = await closed_loop(target, concurrency, seconds, 1.0, record)
    np.save(out, np.asarray(records, dtype=np.float64).reshape(-1, 3))
    print(json.dumps({"requests": len(records), "errors": errors, "rps": len(records) / elapsed}), flush=True)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
