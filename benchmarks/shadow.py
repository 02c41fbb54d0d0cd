"""Issue 5's benchmark: the primary's latency and throughput with a 100% shadow vs none.

Two gateways side by side (same models and weights; one mirrors every live request to 1.14),
closed loop, batch 1, at concurrency 1, 8 and 32, alternating over rounds. After each run
the shadow's report gives mirrored / compared / dropped copies, to show that overload sheds
shadow copies instead of growing the primary's latency.
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


def _gateway(name: str, config: Path, scratch: str) -> Server:
    return start_gateway(
        name,
        extra=[
            "--config", str(config), "--admin-listen", "127.0.0.1:0", "--store", f"sqlite:///{scratch}/{name}.db",
            "--shadow-log-dir", f"{scratch}/{name}-shadow",
        ],
        env={"GATEWAY_ADMIN_TOKENS": f"bench={TOKEN}"},
    )  # fmt: skip


def _totals(server: Server) -> tuple[int, int, int]:
    admin = server.ready_line.split("admin on ")[1].split()[0]
    with grpc.insecure_channel(admin) as channel:
        report = pb_grpc.AdminStub(channel).GetShadowReport(
            pb.GetShadowReportRequest(endpoint="ctr-ranker", window_seconds=86400),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=10,
        )
    return report.mirrored, report.compared, report.dropped


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        base = (
            (ROOT / "models" / "gateway.yaml")
            .read_text()
            .replace("model_root: .", f"model_root: {ROOT / 'models'}")
        )
        plain, shadowed = Path(scratch) / "plain.yaml", Path(scratch) / "shadowed.yaml"
        plain.write_text(base)
        shadowed.write_text(
            base.replace("    nan_policy: allow", '    nan_policy: allow\n    shadows: {"1.14": 100}')
        )
        servers = [_gateway("no-shadow", plain, scratch), _gateway("shadow-100", shadowed, scratch)]
        rows, shedding = [], []
        try:
            for concurrency in concurrencies:
                results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
                before = _totals(servers[1])
                for _ in range(rounds):
                    for server in servers:
                        results[server.name].append(load(server, concurrency, seconds))
                after = _totals(servers[1])
                mirrored, compared, dropped = (a - b for a, b in zip(after, before, strict=True))
                shedding.append(
                    f"| {concurrency} | {mirrored} | {compared} | {dropped} | {dropped / max(mirrored, 1):.0%} |"
                )
                medians = {
                    n: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    for n, runs in results.items()
                }
                off, on = medians["no-shadow"], medians["shadow-100"]
                for name, m in medians.items():
                    rows.append(
                        f"| {concurrency} | {name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                        f"{m['cpu_us_per_req']:.0f} |"
                    )
                rows.append(
                    f"| {concurrency} | **shadow / none** | **{on['rps'] / off['rps']:.2f}x** | "
                    f"**{on['p50_ms'] / off['p50_ms']:.2f}x** | **{on['p99_ms'] / off['p99_ms']:.2f}x** | |"
                )
        finally:
            for server in servers:
                server.stop()
    return (
        "| concurrency | gateway | requests/s | p50 ms | p99 ms | server CPU us/req |\n"
        "|---:|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n\nShadow copies during the shadow-100 runs:\n\n"
        "| concurrency | mirrored | compared | dropped | shed |\n|---:|---:|---:|---:|---:|\n"
        + "\n".join(shedding)
    )
