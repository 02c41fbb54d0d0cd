"""Issue 12's benchmark: ModelStreamInfer over one stream vs unary ModelInfer, concurrency 1, side by side.

One gateway; the two clients (benchmarks.stream_loadgen) alternate against it, batch 1, the
same requests with routing keys. Ratios are the median of per-round ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import Server, cpu_seconds, errors_checked, paired_ratio, start_gateway, summarize
from testkit.gateways import ROOT

MODES = ("unary", "stream")


def _load(server: Server, mode: str, seconds: float) -> dict[str, float]:
    args = [sys.executable, "-m", "benchmarks.stream_loadgen", server.target, mode, str(seconds)]
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert client.stdout is not None
    if client.stdout.readline().strip() != "measuring":
        raise RuntimeError(f"{mode} client failed (code {client.wait(30)})")
    before = cpu_seconds(server.process.pid)
    line = client.stdout.readline()
    after = cpu_seconds(server.process.pid)
    if client.wait(timeout=30) != 0 or not line:
        raise RuntimeError(f"{mode} client failed (code {client.returncode})")
    result: dict[str, float] = json.loads(line)
    result["cpu_us_per_req"] = (after - before) / max(result["requests"], 1) * 1e6
    return result


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    server = start_gateway("streaming")
    try:
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for round_index in range(rounds):
            for mode in MODES if round_index % 2 == 0 else reversed(MODES):
                results[mode].append(_load(server, mode, seconds))
    finally:
        server.stop()
    rows, errors = [], 0.0
    for mode in MODES:
        m = summarize(results[mode])
        errors += m["errors"]
        ratio = "" if mode == "unary" else f"**{paired_ratio(results[mode], results['unary'], 'rps'):.2f}x**"
        cpu = "" if mode == "unary" else f"**{paired_ratio(results[mode], results['unary'], 'cpu_us_per_req'):.2f}x**"
        rows.append(
            f"| {mode} | {m['rps']:.0f} | {ratio} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
            f"{m['cpu_us_per_req']:.0f} | {cpu} | {m['errors']:.0f} |"
        )
    text = (
        f"{rounds} round(s) of {seconds:g} s per client, alternating; one caller, batch 1; medians (errors summed), "
        "ratios: median of per-round ratios.\n\n"
        "| ModelInfer over | requests/s | vs unary | p50 ms | p99 ms | server CPU us/req | vs unary | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    return errors_checked("streaming", text, errors)
