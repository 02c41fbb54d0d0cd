"""Issue 4's benchmark: the gateway with all telemetry on vs all off, side by side.

"On": tracing at 100% sampling exported over OTLP/gRPC to a sink process, metrics on a
Prometheus endpoint and exported over OTLP. "Off": no OTel at all (the sliding windows that
the guardrails read are always on, in both). Closed loop, batch 1, concurrency 8 and 32.
"""

from __future__ import annotations

import statistics
import sys
import tempfile

from benchmarks.common import Server, load, start, start_gateway


def _gateway(name: str, sink: str, sample: str) -> Server:
    return start_gateway(
        name,
        extra=[
            "--admin-listen", "127.0.0.1:0", "--store", f"sqlite:///{tempfile.mkdtemp()}/state.db",
            "--metrics-listen", "127.0.0.1:0", "--otlp-endpoint", f"http://{sink}", "--trace-sample", sample,
        ],
    )  # fmt: skip


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    sink = start("otlp-sink", [sys.executable, "-m", "benchmarks.otlp_sink"], r"ready (\d+)")
    servers = [
        start_gateway("telemetry off"),
        _gateway("telemetry on", sink.target, "1.0"),
        _gateway("on, 10% of traces", sink.target, "0.1"),
    ]
    rows = []
    try:
        for concurrency in [c for c in concurrencies if c > 1]:
            results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
            for _ in range(rounds):
                for server in servers:
                    results[server.name].append(load(server, concurrency, seconds))
            medians = {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in results.items()}
            off = medians["telemetry off"]
            for name, m in medians.items():
                ratio = f"**{m['rps'] / off['rps']:.2f}x**" if name != "telemetry off" else ""
                cpu = f"**{m['cpu_us_per_req'] / off['cpu_us_per_req']:.2f}x**" if name != "telemetry off" else ""
                latency = f"{m['p50_ms']:.3f} | {m['p99_ms']:.3f}"
                rate = f"{m['rps']:.0f} | {ratio}"
                usage = f"{m['cpu_us_per_req']:.0f} | {cpu}"
                rows.append(f"| {concurrency} | {name} | {rate} | {latency} | {usage} |")
    finally:
        for server in [*servers, sink]:
            server.stop()
    return (
        "| concurrency | gateway | requests/s | vs off | p50 ms | p99 ms | server CPU us/req | vs off |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
