"""Issue 5's benchmark: the primary's latency and throughput with a 100% shadow vs none.

Three gateways side by side (same models and weights): no shadow; every live request
mirrored to 1.14; and the same with a shadow queue of 16, so the CPU budget's pauses show
up as shed copies. Closed loop, batch 1, concurrency 1, 8 and 32, alternating over rounds.
After each concurrency the shadows' reports give mirrored / compared / dropped copies.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import grpc

from benchmarks.common import ROOT, Server, load, start_gateway
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc

TOKEN = "bench-admin-token-0123456789"
NONE = "no shadow"


def _gateway(name: str, config: Path, scratch: str, *extra: str) -> Server:
    slug = name.replace(" ", "-").replace(",", "")
    arguments = ["--config", str(config), "--admin-listen", "127.0.0.1:0"]
    arguments += [
        "--store",
        f"sqlite:///{scratch}/{slug}.db",
        "--shadow-log-dir",
        f"{scratch}/{slug}",
        *extra,
    ]
    return start_gateway(name, extra=arguments, env={"GATEWAY_ADMIN_TOKENS": f"bench={TOKEN}"})


def _totals(server: Server) -> tuple[int, int, int]:
    admin = server.ready_line.split("admin on ")[1].split()[0]
    with grpc.insecure_channel(admin) as channel:
        report = pb_grpc.AdminStub(channel).GetShadowReport(
            pb.GetShadowReportRequest(endpoint="ctr-ranker", window_seconds=86400),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=10,
        )
    return report.mirrored, report.compared, report.dropped


def _row(concurrency: int, name: str, m: dict[str, float], off: dict[str, float]) -> str:
    versus = ""
    if name != NONE:
        ratios = (m["rps"] / off["rps"], m["p50_ms"] / off["p50_ms"], m["p99_ms"] / off["p99_ms"])
        versus = " / ".join(f"**{r:.2f}x**" for r in ratios)
    figures = f"{m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['cpu_us_per_req']:.0f}"
    return f"| {concurrency} | {name} | {figures} | {versus} |"


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        base = (ROOT / "models" / "gateway.yaml").read_text().replace("model_root: .", f"model_root: {ROOT / 'models'}")
        plain, shadowed = Path(scratch) / "plain.yaml", Path(scratch) / "shadowed.yaml"
        plain.write_text(base)
        shadowed.write_text(base.replace("    nan_policy: allow", '    nan_policy: allow\n    shadows: {"1.14": 100}'))
        servers = [
            _gateway(NONE, plain, scratch),
            _gateway("shadow 100%", shadowed, scratch),
            _gateway("shadow 100%, queue 16", shadowed, scratch, "--shadow-queue", "16"),
        ]
        rows, shedding = [], []
        try:
            for concurrency in concurrencies:
                results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
                before = [_totals(s) for s in servers[1:]]
                for _ in range(rounds):
                    for server in servers:
                        results[server.name].append(load(server, concurrency, seconds))
                for server, earlier in zip(servers[1:], before, strict=True):
                    mirrored, compared, dropped = (a - b for a, b in zip(_totals(server), earlier, strict=True))
                    shed = f"{dropped / max(mirrored, 1):.0%}"
                    shedding.append(f"| {concurrency} | {server.name} | {mirrored} | {compared} | {dropped} | {shed} |")
                medians = {
                    name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                    for name, runs in results.items()
                }
                rows.extend(_row(concurrency, name, m, medians[NONE]) for name, m in medians.items())
        finally:
            for server in servers:
                server.stop()
    return (
        "| concurrency | gateway | requests/s | p50 ms | p99 ms | server CPU us/req | rps/p50/p99 vs none |\n"
        "|---:|---|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\nShadow copies during the runs:\n\n"
        "| concurrency | gateway | mirrored | compared | dropped | shed |\n|---:|---|---:|---:|---:|---:|\n"
        + "\n".join(shedding)
    )
