"""Issue 7's benchmark: `gateway batch score` vs onnxruntime directly on the same batches, and
peak memory with 1M rows vs 100k rows (it should not grow with the file).

Each measurement is its own process; peak RSS is that process's VmHWM from /proc (reset at
exec, so it does not inherit this driver's memory the way getrusage's ru_maxrss does). 32
float features per row, chunks of 65,536 rows; the gateway run includes reading, scoring,
writing Parquet, hashing input and output, and the manifest. The two paths alternate (the
order reversed on odd rounds); every run must exit 0 and score every row.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import STABLE_MODEL, alternate, paired_ratio
from testkit.gateways import DEMO_CONFIG, ROOT

CHUNK = 65_536
BIG, SMALL = 1_000_000, 100_000


def _table(rows: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, 250_000):
        n = min(250_000, rows - start)
        x = rng.normal(size=(n, 32)).astype(np.float32)
        table = pa.table({"id": np.arange(start, start + n), **{f"f{i}": x[:, i] for i in range(32)}})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=CHUNK)
    assert writer is not None
    writer.close()


def _json(name: str, command: list[str], rows: int) -> dict[str, float]:
    """Run one measurement; fail loudly unless it exits 0 and scored all `rows`."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False, timeout=900)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"batch {name}: exit code {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    result: dict[str, float] = json.loads(lines[-1])
    if result["rows"] != rows:
        raise RuntimeError(f"batch {name}: scored {result['rows']} rows, expected {rows}")
    return result


def _direct(data: Path, rows: int) -> dict[str, float]:
    return _json(
        "direct", [sys.executable, "-m", "benchmarks.batch_direct", str(data), str(STABLE_MODEL), str(CHUNK)], rows
    )


def _gateway(data: Path, rows: int, scratch: Path, run_id: str) -> dict[str, float]:
    columns = ",".join(f"f{i}" for i in range(32))
    return _json("gateway", [
        sys.executable, "-m", "benchmarks.batch_cli", "batch", "score", "ctr-ranker", "--version", "1.12",
        "--input", str(data), "--run-id", run_id, "--columns", columns, "--keep-columns", "id",
        "--chunk-rows", str(CHUNK), "--json", "--store", f"sqlite:///{scratch}/state.db",
        "--output-root", str(scratch / "out"), "--config", str(DEMO_CONFIG),
    ], rows)  # fmt: skip


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    del seconds, concurrencies
    rounds = max(rounds, 1)
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        big, small = scratch / "rows-1m.parquet", scratch / "rows-100k.parquet"
        _table(BIG, big)
        _table(SMALL, small)
        runs = iter(range(rounds))

        def measure(path: str) -> dict[str, float]:
            if path == "direct":
                return _direct(big, BIG)
            return _gateway(big, BIG, scratch, f"big-{next(runs)}")

        direct, gateway = alternate(["direct", "gateway"], rounds, measure)
        small_run = _gateway(small, SMALL, scratch, "small")
    median = statistics.median
    d, g = median(r["seconds"] for r in direct), median(r["seconds"] for r in gateway)
    direct_peak, gateway_peak = median(r["peak_mb"] for r in direct), median(r["peak_mb"] for r in gateway)
    speed = paired_ratio(direct, gateway, "seconds")  # gateway rows/s over direct rows/s, per round
    return (
        f"{BIG:,} rows x 32 features, chunks of {CHUNK:,} rows, {rounds} round(s) alternating, medians; "
        "peak RSS: the scoring process's VmHWM; every run exited 0 and scored every row:\n\n"
        "| path | seconds | rows/s | peak RSS |\n|---|---:|---:|---:|\n"
        f"| onnxruntime directly (read batches + run) | {d:.2f} | {BIG / d:,.0f} | {direct_peak:.0f} MB |\n"
        f"| `gateway batch score` (read, run, write Parquet, hash, manifest) | {g:.2f} | {BIG / g:,.0f} | "
        f"{gateway_peak:.0f} MB |\n"
        f"| **gateway / direct** (median of per-round ratios) | | **{speed:.2f}x** | |\n\n"
        f"Peak RSS of `gateway batch score`: {SMALL:,} rows {small_run['peak_mb']:.0f} MB, "
        f"{BIG:,} rows {gateway_peak:.0f} MB."
    )
