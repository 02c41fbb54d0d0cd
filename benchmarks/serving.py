"""Issue 2's benchmark: the gateway (90/10 split) vs a bare grpc.aio + onnxruntime server.

Closed loop, batch 1, concurrency 1/8/32, both servers measured side by side in one run
(alternating, `rounds` times, the order reversed on odd rounds), plus in-process onnxruntime
latency as the floor. Server CPU per request is read from /proc for the server process. Per
server: medians over rounds, errors summed; gateway / bare: the median of the per-round ratios
(differences for latency).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import numpy as np
import onnxruntime as ort

from benchmarks.common import (
    STABLE_MODEL,
    Server,
    alternate,
    errors_checked,
    load,
    paired_delta,
    paired_ratio,
    start_bare,
    start_gateway,
    summarize,
)


def onnxruntime_floor(iterations: int = 20000) -> float:
    """Median in-process session.run latency for batch 1, microseconds."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(STABLE_MODEL), sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32)
    for _ in range(1000):
        session.run(["score"], {"features": x})
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        session.run(["score"], {"features": x})
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    floor = onnxruntime_floor()
    servers: list[Server] = []
    rows, errors = [], 0.0
    try:
        servers.extend([start_bare(), start_gateway()])
        for concurrency in concurrencies:
            bare_runs, gateway_runs = alternate(
                servers, rounds, partial(load, concurrency=concurrency, seconds=seconds)
            )
            for server, runs in zip(servers, (bare_runs, gateway_runs), strict=True):
                m = summarize(runs)
                errors += m["errors"]
                rows.append(
                    f"| {concurrency} | {server.name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                    f"{m['cpu_us_per_req']:.0f} | {m['errors']:.0f} |"
                )
            rps = paired_ratio(gateway_runs, bare_runs, "rps")
            cpu = paired_ratio(gateway_runs, bare_runs, "cpu_us_per_req")
            p50, p99 = (paired_delta(gateway_runs, bare_runs, k) for k in ("p50_ms", "p99_ms"))
            rows.append(
                f"| {concurrency} | **gateway / bare** | **{rps:.2f}x** | {p50:+.3f} ms | {p99:+.3f} ms | "
                f"**{cpu:.2f}x** | |"
            )
    finally:
        for server in servers:
            server.stop()
    text = (
        f"In-process onnxruntime, batch 1 (the floor): median {floor:.1f} us per run\n\n"
        f"{rounds} round(s) of {seconds:g} s per server, alternating; per server medians (errors summed); "
        "gateway / bare: median of the per-round ratios (differences for p50/p99)\n\n"
        "| concurrency | server | requests/s | p50 ms | p99 ms | server CPU us/req | errors |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    return errors_checked("serving", text, errors)
