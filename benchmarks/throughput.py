"""Issue 16's benchmark: a heavier model (32 -> 1024 -> 1024 -> 1 MLP), built into a scratch directory,
and a wider variant (2048 units per hidden layer) whose batch-1 run costs ~0.3-0.4 ms here.

Five servers side by side, alternating (the order reversed on odd rounds), closed loop:
- bare aio: a grpc.aio server running the model inline on its event loop;
- bare thread-pool: a thread-pool gRPC server (8 threads) running the model in its handlers;
- gateway inline: `runner: inline` (every run on the event loop, the gateway before issue 16);
- gateway: the default, `runner: auto` (runs measured above the inline limit go to the pool);
- gateway batching: `batching: {max_batch_size: 32, max_delay_ms: 2}` with `runner: auto`.

Batch 1 at each concurrency, then 16 rows per request (a ranking call with candidates) at
concurrency 8. Per server: medians over rounds, errors summed; ratios: the median of per-round
ratios. Server CPU % is the server process's CPU time over the measured window (100% = one core).
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

from benchmarks.common import (
    Server,
    alternate,
    errors_checked,
    load,
    paired_ratio,
    start_bare,
    start_gateway,
    summarize,
)
from models import make_heavy_model

MAX_DELAY_MS = 2.0
BATCHING = f"{{max_batch_size: 32, max_delay_ms: {MAX_DELAY_MS:g}}}"
BARE_THREADS = 8
RANKING_ROWS = 16
#: Hidden-layer widths: the issue's model, and one whose batch-1 run costs what the issue assumed (0.3-0.7 ms).
WIDTHS = (make_heavy_model.HIDDEN, 2048)


def _route_file(root: Path, name: str, extra: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(make_heavy_model.ROUTE_FILE + "".join(f"    {line}\n" for line in extra.splitlines()))
    return path


def _servers(root: Path, hidden: int) -> list[Server]:
    directory = make_heavy_model.write(root, hidden).parent / make_heavy_model.ENDPOINT / make_heavy_model.VERSION
    model = directory / "model.onnx"
    servers: list[Server] = []
    try:
        servers.append(start_bare("bare aio", model))
        servers.append(start_bare("bare thread-pool", model, threads=BARE_THREADS))
        for name, extra in (
            ("gateway inline", "runner: inline"),
            ("gateway", ""),
            ("gateway batching", f"batching: {BATCHING}"),
        ):
            servers.append(start_gateway(name, ["--config", str(_route_file(root, name.replace(" ", "-"), extra))]))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _row(label: str, server: Server, m: dict[str, float]) -> str:
    return (
        f"| {label} | {server.name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
        f"{m['cpu_us_per_req']:.0f} | {m['cpu_percent']:.0f}% | {m['errors']:.0f} |"
    )


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    rows: list[str] = []
    ratios: list[str] = []
    errors = 0.0
    for hidden in WIDTHS:
        errors += _width(hidden, seconds, rounds, concurrencies, rows, ratios)
    text = (
        f"Model: {make_heavy_model.ENDPOINT} ({make_heavy_model.FEATURES} -> H -> H -> 1, H = "
        f"{' and '.join(map(str, WIDTHS))}), built by models/make_heavy_model.py into a scratch directory. "
        f"Batching: {BATCHING}. {rounds} round(s) of {seconds:g} s per server, alternating; per server medians "
        "(errors summed); ratios: median of per-round ratios.\n\n"
        "| H | concurrency | server | requests/s | p50 ms | p99 ms | server CPU us/req | server CPU | errors |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "| H | concurrency | batching on / off (requests/s) | p50 on / off + max_delay | gateway / best bare "
        "| gateway / gateway inline | batching / best bare |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n" + "\n".join(ratios)
    )
    return errors_checked("throughput", text, errors)


def _width(
    hidden: int, seconds: float, rounds: int, concurrencies: tuple[int, ...], rows: list[str], ratios: list[str]
) -> float:
    errors = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-heavy-") as scratch:
        servers = _servers(Path(scratch), hidden)
        by_name = {s.name: i for i, s in enumerate(servers)}
        try:
            cases = [(c, 1) for c in concurrencies] + [(8, RANKING_ROWS)]
            for concurrency, request_rows in cases:
                measure = partial(
                    load, concurrency=concurrency, seconds=seconds, model=make_heavy_model.ENDPOINT, rows=request_rows
                )
                results = alternate(servers, rounds, measure)
                label = f"{hidden} | {concurrency}" + (f" x {request_rows} rows" if request_rows > 1 else "")
                for server, runs in zip(servers, results, strict=True):
                    m = summarize(runs)
                    errors += m["errors"]
                    rows.append(_row(label, server, m))
                gateway, batching = results[by_name["gateway"]], results[by_name["gateway batching"]]
                inline = results[by_name["gateway inline"]]
                best_bare = max(
                    (results[by_name["bare aio"]], results[by_name["bare thread-pool"]]),
                    key=lambda runs: summarize(runs)["rps"],
                )
                p50_on, p50_off = summarize(batching)["p50_ms"], summarize(gateway)["p50_ms"]
                ratios.append(
                    f"| {label} | {paired_ratio(batching, gateway, 'rps'):.2f}x | "
                    f"{p50_on:.3f} / {p50_off:.3f} + {MAX_DELAY_MS:g} ms | "
                    f"{paired_ratio(gateway, best_bare, 'rps'):.2f}x | {paired_ratio(gateway, inline, 'rps'):.2f}x | "
                    f"{paired_ratio(batching, best_bare, 'rps'):.2f}x |"
                )
        finally:
            for server in servers:
                server.stop()
    return errors
