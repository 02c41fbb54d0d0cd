"""Issue 2's benchmark: the gateway (90/10 split) vs a bare grpc.aio + onnxruntime server.

Closed loop, batch 1, concurrency 1/8/32, both servers measured side by side in one run
(alternating, `rounds` times, medians reported), plus in-process onnxruntime latency as the
floor. Server CPU per request is read from /proc for the server process.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort

from benchmarks.common import ROOT, load, start_bare, start_gateway


def onnxruntime_floor(iterations: int = 20000) -> float:
    """Median in-process session.run latency for batch 1, microseconds."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(ROOT / "models" / "ctr-ranker" / "1.12" / "model.onnx"),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
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
    servers = [start_bare(), start_gateway()]
    rows = []
    try:
        for concurrency in concurrencies:
            results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
            for _ in range(rounds):
                for server in servers:
                    results[server.name].append(load(server, concurrency, seconds))
            medians = {
                name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()
            }
            bare, gateway = medians["bare"], medians["gateway"]
            for name, m in medians.items():
                rows.append(
                    f"| {concurrency} | {name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                    f"{m['cpu_us_per_req']:.0f} | {int(m['errors'])} |"
                )
            p50_delta = gateway["p50_ms"] - bare["p50_ms"]
            p99_delta = gateway["p99_ms"] - bare["p99_ms"]
            rows.append(
                f"| {concurrency} | **gateway / bare** | **{gateway['rps'] / bare['rps']:.2f}x** | "
                f"{p50_delta:+.3f} ms | {p99_delta:+.3f} ms | "
                f"**{gateway['cpu_us_per_req'] / bare['cpu_us_per_req']:.2f}x** | |"
            )
    finally:
        for server in servers:
            server.stop()
    header = (
        f"In-process onnxruntime, batch 1 (the floor): median {floor:.1f} us per run\n\n"
        "| concurrency | server | requests/s | p50 ms | p99 ms | server CPU us/req | errors |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n"
    )
    return header + "\n".join(rows)
