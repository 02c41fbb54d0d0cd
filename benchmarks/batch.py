"""Issue 7's benchmark: `gateway batch score` vs onnxruntime directly on the same batches, and
peak memory with 1M rows vs 100k rows (it should not grow with the file).

Each measurement is its own process (peak RSS from getrusage). 32 float features per row,
chunks of 65,536 rows; the gateway run includes reading, scoring, writing Parquet, hashing
input and output, and the manifest.
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

from benchmarks.common import ROOT

CHUNK = 65_536


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


def _json(command: list[str]) -> dict[str, float]:
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True, timeout=900).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def _gateway(data: Path, scratch: Path, run_id: str) -> dict[str, float]:
    columns = ",".join(f"f{i}" for i in range(32))
    return _json([
        sys.executable, "-m", "benchmarks.batch_cli", "batch", "score", "ctr-ranker", "--version", "1.12",
        "--input", str(data), "--run-id", run_id, "--columns", columns, "--keep-columns", "id",
        "--chunk-rows", str(CHUNK), "--json", "--store", f"sqlite:///{scratch}/state.db",
        "--output-root", str(scratch / "out"), "--config", str(ROOT / "models" / "gateway.yaml"),
    ])  # fmt: skip


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    del seconds, concurrencies
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        big, small = scratch / "rows-1m.parquet", scratch / "rows-100k.parquet"
        _table(1_000_000, big)
        _table(100_000, small)
        model = str(ROOT / "models" / "ctr-ranker" / "1.12" / "model.onnx")
        gateway_s, direct_s, gateway_peak, direct_peak = [], [], [], []
        for round_index in range(max(rounds, 1)):
            direct = _json([sys.executable, "-m", "benchmarks.batch_direct", str(big), model, str(CHUNK)])
            gateway = _gateway(big, scratch, f"big-{round_index}")
            direct_s.append(direct["seconds"])
            gateway_s.append(gateway["seconds"])
            direct_peak.append(direct["peak_kb"])
            gateway_peak.append(gateway["peak_kb"])
        small_run = _gateway(small, scratch, "small")
    g, d = statistics.median(gateway_s), statistics.median(direct_s)
    return (
        f"1,000,000 rows x 32 features, chunks of {CHUNK:,} rows, {max(rounds, 1)} round(s), medians:\n\n"
        "| path | seconds | rows/s | peak RSS |\n|---|---:|---:|---:|\n"
        f"| onnxruntime directly (read batches + run) | {d:.2f} | {1e6 / d:,.0f} | "
        f"{statistics.median(direct_peak) / 1024:.0f} MB |\n"
        f"| `gateway batch score` (read, run, write Parquet, hash, manifest) | {g:.2f} | {1e6 / g:,.0f} | "
        f"{statistics.median(gateway_peak) / 1024:.0f} MB |\n"
        f"| **gateway / direct** | | **{d / g:.2f}x** | |\n\n"
        f"Peak RSS of `gateway batch score`: 100,000 rows {small_run['peak_kb'] / 1024:.0f} MB, "
        f"1,000,000 rows {statistics.median(gateway_peak) / 1024:.0f} MB."
    )
