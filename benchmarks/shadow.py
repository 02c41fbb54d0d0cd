"""Issue 5's benchmark: the primary's latency and throughput with a 100% shadow vs none.

Four gateways side by side (same models and weights): no shadow; every live request
mirrored to 1.14; the same with a shadow queue of 16, so the CPU budget's pauses show up as
shed copies; and every request mirrored to a shadow that takes 50 ms longer (an injected
latency fault), which must shed copies rather than slow the primary. Closed loop, batch 1,
concurrency 1, 8 and 32, alternating over rounds (the order reversed on odd rounds); ratios
are the median of per-round ratios. After each concurrency the shadows' reports give
mirrored / compared / dropped copies.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import grpc

from benchmarks.common import (
    ADMIN_METADATA,
    Server,
    admin_target,
    alternate,
    errors_checked,
    load,
    paired_ratio,
    start_gateway,
    summarize,
)
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc
from testkit.gateways import DEMO_CONFIG, MODELS

NONE = "no shadow"
SLOW = "shadow 100%, 50 ms slower"


def _totals(server: Server) -> tuple[int, int, int]:
    with grpc.insecure_channel(admin_target(server)) as channel:
        report = pb_grpc.AdminStub(channel).GetShadowReport(
            pb.GetShadowReportRequest(endpoint="ctr-ranker", window_seconds=86400), metadata=ADMIN_METADATA, timeout=10
        )
    return report.mirrored, report.compared, report.dropped


def _slow_down_the_shadow(server: Server) -> None:
    """Every shadow run of 1.14 waits 50 ms first (an injected fault): the primary must not notice."""
    with grpc.insecure_channel(admin_target(server)) as channel:
        pb_grpc.AdminStub(channel).SetFault(
            pb.SetFaultRequest(endpoint="ctr-ranker", version="1.14", latency_ms=50, reason="slow shadow"),
            metadata=ADMIN_METADATA,
            timeout=10,
        )


def _row(concurrency: int, name: str, runs: list[dict[str, float]], off: list[dict[str, float]]) -> str:
    m = summarize(runs)
    versus = ""
    if name != NONE:
        versus = " / ".join(f"**{paired_ratio(runs, off, key):.2f}x**" for key in ("rps", "p50_ms", "p99_ms"))
    figures = f"{m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['cpu_us_per_req']:.0f}"
    return f"| {concurrency} | {name} | {figures} | {versus} | {m['errors']:.0f} |"


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    servers: list[Server] = []
    rows: list[str] = []
    shedding: list[str] = []
    errors = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        base = DEMO_CONFIG.read_text().replace("model_root: .", f"model_root: {MODELS}")
        plain, shadowed = Path(scratch) / "plain.yaml", Path(scratch) / "shadowed.yaml"
        plain.write_text(base)
        shadowed.write_text(base.replace("    nan_policy: allow", '    nan_policy: allow\n    shadows: {"1.14": 100}'))
        try:
            servers.append(start_gateway(NONE, ["--config", str(plain)]))
            servers.append(start_gateway("shadow 100%", ["--config", str(shadowed)]))
            servers.append(start_gateway("shadow 100%, queue 16", ["--config", str(shadowed), "--shadow-queue", "16"]))
            servers.append(start_gateway(SLOW, ["--config", str(shadowed)]))
            _slow_down_the_shadow(servers[-1])
            for concurrency in concurrencies:
                before = [_totals(s) for s in servers[1:]]
                results = alternate(servers, rounds, partial(load, concurrency=concurrency, seconds=seconds))
                for server, earlier in zip(servers[1:], before, strict=True):
                    mirrored, compared, dropped = (a - b for a, b in zip(_totals(server), earlier, strict=True))
                    shed = f"{dropped / max(mirrored, 1):.0%}"
                    shedding.append(f"| {concurrency} | {server.name} | {mirrored} | {compared} | {dropped} | {shed} |")
                errors += sum(r["errors"] for runs in results for r in runs)
                rows.extend(
                    _row(concurrency, s.name, runs, results[0]) for s, runs in zip(servers, results, strict=True)
                )
        finally:
            for server in servers:
                server.stop()
    text = (
        f"{rounds} round(s) of {seconds:g} s per gateway, alternating; medians (errors summed), "
        "ratios: median of per-round ratios\n\n"
        "| concurrency | gateway | requests/s | p50 ms | p99 ms | server CPU us/req | rps/p50/p99 vs none | errors |\n"
        "|---:|---|---:|---:|---:|---:|---|---:|\n" + "\n".join(rows) + "\n\nShadow copies during the runs:\n\n"
        "| concurrency | gateway | mirrored | compared | dropped | shed |\n|---:|---|---:|---:|---:|---:|\n"
        + "\n".join(shedding)
    )
    return errors_checked("shadow", text, errors)
