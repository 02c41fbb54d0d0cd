"""Issue 4's benchmark: the gateway with all telemetry on vs all off, side by side.

"On": tracing at 100% sampling exported over OTLP/gRPC to a sink process, metrics on a
Prometheus endpoint and exported over OTLP. "Off": no OTel at all (the sliding windows that
the guardrails read are always on, in both). Closed loop, batch 1, concurrency 8 and 32,
alternating (the order reversed on odd rounds). Ratios are the median of per-round ratios.

The sink's CPU is counted apart: it stands in for the collector, which runs elsewhere in
production, but receiving what the gateway exports costs CPU on this machine's two cores
during the run. Its column is the sink process's CPU over the same window divided by the
requests (it receives every gateway's exports, but the idle ones only send metrics).
"""

from __future__ import annotations

import sys
from functools import partial

from benchmarks.common import Server, alternate, errors_checked, load, paired_ratio, start, start_gateway, summarize

OFF = "telemetry off"


def _gateway(name: str, sink: str, sample: str) -> Server:
    extra = ["--metrics-listen", "127.0.0.1:0", "--otlp-endpoint", f"http://{sink}", "--trace-sample", sample]
    return start_gateway(name, extra=extra)


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    servers: list[Server] = []
    rows, errors = [], 0.0
    sink = start("otlp-sink", [sys.executable, "-m", "benchmarks.otlp_sink"], r"ready (\d+)")
    try:
        servers.append(start_gateway(OFF))
        servers.append(_gateway("telemetry on", sink.target, "1.0"))
        servers.append(_gateway("on, 10% of traces", sink.target, "0.1"))
        for concurrency in [c for c in concurrencies if c > 1]:
            results = alternate(servers, rounds, partial(load, concurrency=concurrency, seconds=seconds, sink=sink))
            for r in (r for runs in results for r in runs):
                r["total_cpu_us_per_req"] = r["cpu_us_per_req"] + r["sink_cpu_us_per_req"]
            off = results[0]
            for server, runs in zip(servers, results, strict=True):
                m = summarize(runs)
                errors += m["errors"]
                vs_off = ["", "", ""]
                if server.name != OFF:
                    vs_off = [
                        f"**{paired_ratio(runs, off, key):.2f}x**"
                        for key in ("rps", "cpu_us_per_req", "total_cpu_us_per_req")
                    ]
                rows.append(
                    f"| {concurrency} | {server.name} | {m['rps']:.0f} | {vs_off[0]} | {m['p50_ms']:.3f} | "
                    f"{m['p99_ms']:.3f} | {m['cpu_us_per_req']:.0f} | {vs_off[1]} | "
                    f"{m['sink_cpu_us_per_req']:.0f} | {vs_off[2]} | {m['errors']:.0f} |"
                )
    finally:
        for server in [*servers, sink]:
            server.stop()
    text = (
        f"{rounds} round(s) of {seconds:g} s per gateway, alternating; medians (errors summed), "
        "ratios: median of per-round ratios. Sink CPU: the OTLP sink process over the same window, per request "
        "(not in the server CPU column).\n\n"
        "| concurrency | gateway | requests/s | vs off | p50 ms | p99 ms | server CPU us/req | vs off "
        "| sink CPU us/req | server + sink vs off | errors |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    return errors_checked("telemetry", text, errors)
