"""`score`: run a model version over a table in chunks and write an immutable, versioned output.

Input is Parquet or CSV, read in record batches so memory follows the chunk size, not the
file size. The model's input is a fixed-size list column named like the input, or the
table's numeric columns in order (`columns` chooses). The output goes to a hidden
`.RUN.partial` directory and is renamed to `ROOT/ENDPOINT/RUN/` only once the predictions and
the manifest (with their sha256) are complete: a crash leaves no publishable run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from gateway.errors import AlreadyExists, InvalidInput
from gateway.repository import Artifact, ModelRepository, file_sha256
from gateway.runtime import OnnxModel

PREDICTIONS = "predictions.parquet"
MANIFEST = "manifest.json"
RUN_ID = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_."


@dataclass(frozen=True)
class ScoreResult:
    """Where a run went and what it holds."""

    run_id: str
    path: Path
    rows: int
    seconds: float
    manifest: dict[str, Any]


def _batches(path: Path, chunk_rows: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        # pre_buffer would read the whole file ahead: memory would follow the file, not the chunk.
        handle = pq.ParquetFile(path, pre_buffer=False)
        return handle.schema_arrow, handle.iter_batches(batch_size=chunk_rows)
    if path.suffix.lower() in (".csv", ".txt"):
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=max(1 << 20, chunk_rows * 400)))
        return reader.schema, iter(reader)
    raise InvalidInput(f"{path}: unsupported input format {path.suffix!r}; use .parquet or .csv")


def _row_count(path: Path) -> int | None:
    if path.suffix.lower() in (".parquet", ".pq"):
        return int(pq.ParquetFile(path).metadata.num_rows)
    return None


class ColumnMapper:
    """Turns a record batch into the model's input array."""

    def __init__(self, schema: pa.Schema, input_name: str, width: int, columns: Sequence[str] = ()) -> None:
        self.input_name = input_name
        names = list(schema.names)
        if columns:
            missing = [c for c in columns if c not in names]
            if missing:
                raise InvalidInput(f"--columns names {missing} not in the input; columns: {', '.join(names)}")
            self.columns = list(columns)
        elif (input_name in names and pa.types.is_list(schema.field(input_name).type)) or (
            input_name in names and pa.types.is_fixed_size_list(schema.field(input_name).type)
        ):
            self.columns = [input_name]
        else:
            self.columns = [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
        self.list_column = len(self.columns) == 1 and not (
            pa.types.is_integer(schema.field(self.columns[0]).type)
            or pa.types.is_floating(schema.field(self.columns[0]).type)
        )
        count = width if self.list_column else len(self.columns)
        if count != width:
            raise InvalidInput(
                f"the model input {input_name!r} takes {width} features per row, but {len(self.columns)} numeric "
                f"columns were found ({', '.join(self.columns[:6])}{'...' if len(self.columns) > 6 else ''}); "
                f"use --columns, or a list column named {input_name!r}"
            )
        self.width = width

    def null_counts(self, batch: pa.RecordBatch) -> np.ndarray:
        """Missing (null) input values per feature in this batch, from Arrow's null bitmaps (no scan)."""
        if self.list_column:
            column = batch.column(self.columns[0])
            flat = column.flatten()
            if not flat.null_count:
                return np.zeros(self.width, dtype=np.int64)
            mask = flat.is_null().to_numpy(zero_copy_only=False).reshape(len(column), self.width)
            counts: np.ndarray = mask.sum(axis=0)
            return counts
        return np.array([batch.column(c).null_count for c in self.columns], dtype=np.int64)

    def array(self, batch: pa.RecordBatch) -> np.ndarray:
        """[rows, width] float32 (nulls become NaN)."""
        if self.list_column:
            column = batch.column(self.columns[0])
            values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            result: np.ndarray = values.reshape(len(column), self.width)
            return result
        return np.column_stack(
            [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in self.columns]
        )


class Progress:
    """A progress line on stderr with rows/s (quiet when not a terminal, unless forced)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.started = time.perf_counter()
        self._last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        """Redraw (at most twice a second, and once at the end)."""
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.5 and not final):
            return
        self._last = now
        rate = done / max(now - self.started, 1e-9)
        if self.total:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            text = f"\r[{bar}] {done:,}/{self.total:,} rows  {rate:,.0f} rows/s"
        else:
            text = f"\r{done:,} rows  {rate:,.0f} rows/s"
        sys.stderr.write(text + ("\n" if final else ""))
        sys.stderr.flush()


def _summary(scores: np.ndarray) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return {"count": 0}
    q = np.quantile(finite, [0.01, 0.5, 0.99])
    return {
        "count": len(finite),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "min": float(finite.min()),
        "p01": float(q[0]),
        "p50": float(q[1]),
        "p99": float(q[2]),
        "max": float(finite.max()),
        "nulls": int(len(scores) - len(finite)),
    }


def check_run_id(run_id: str) -> str:
    """A run id usable as a directory name."""
    if not run_id or any(c not in RUN_ID for c in run_id) or run_id.startswith("."):
        raise InvalidInput(f"run id {run_id!r}: use letters, digits, '-', '_' or '.' (not starting with '.')")
    return run_id


@dataclass(frozen=True)
class ScoreRequest:
    """What to score with which version, and where the run goes."""

    endpoint: str
    version: str
    artifact: Artifact
    input_path: Path
    output_root: Path
    run_id: str = ""
    columns: Sequence[str] = ()
    keep_columns: Sequence[str] = ()
    chunk_rows: int = 65_536
    progress: bool = False


@dataclass
class _Scored:
    rows: int
    scores: np.ndarray
    null_inputs: np.ndarray


def score(
    request: ScoreRequest,
    repository: ModelRepository,
    *,
    clock: Callable[[], float] = time.time,
    after_chunk: Callable[[int], None] | None = None,
) -> ScoreResult:
    """Score the input with one version; returns the finished run."""
    started_at = clock()
    run_id = check_run_id(request.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at)))
    base = request.output_root / request.endpoint
    final = base / run_id
    if final.exists():
        raise AlreadyExists(f"{final} exists; runs are immutable: choose a new --run-id")
    partial = base / f".{run_id}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # the leftovers of a crashed attempt are never published
    partial.mkdir(parents=True)
    model = OnnxModel(repository.read_verified(request.artifact), source=request.artifact.path)
    if len(model.inputs) != 1:
        raise InvalidInput(f"{request.endpoint} {request.version} takes {len(model.inputs)} inputs; batch takes one")
    spec = model.inputs[0]
    width = math.prod(d or 1 for d in spec.shape[1:])
    schema, batches = _batches(request.input_path, request.chunk_rows)
    mapper = ColumnMapper(schema, spec.name, width, request.columns)
    missing = [c for c in request.keep_columns if c not in schema.names]
    if missing:
        raise InvalidInput(f"--keep-columns {missing} are not in the input; columns: {', '.join(schema.names)}")
    bar = Progress(_row_count(request.input_path), request.progress)
    # Hash the input beside the scoring (hashlib releases the GIL): the digest is ready when scoring ends.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-sha256") as hasher:
        input_digest = hasher.submit(file_sha256, request.input_path)
        scored = _write(
            partial / PREDICTIONS,
            batches,
            mapper,
            model=model,
            keep=request.keep_columns,
            bar=bar,
            after_chunk=after_chunk,
        )
        input_sha256 = input_digest.result()
    manifest = {
        "endpoint": request.endpoint,
        "run_id": run_id,
        "model": {"version": request.version, "path": request.artifact.path, "sha256": request.artifact.sha256},
        "input": {
            "path": str(request.input_path.resolve()),
            "sha256": input_sha256,
            "rows": scored.rows,
        },
        "input_columns": mapper.columns,
        "input_null_counts": {n: int(c) for n, c in zip(_feature_names(mapper), scored.null_inputs, strict=True)},
        "output": {
            "file": PREDICTIONS,
            "sha256": file_sha256(partial / PREDICTIONS),
            "rows": scored.rows,
            "schema": _schema(pq.read_schema(partial / PREDICTIONS)),
            "score_column": model.output_names[0],
        },
        "score_summary": _summary(scored.scores),
        "started_at": started_at,
        "finished_at": clock(),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, final)  # atomic: the run appears whole or not at all
    return ScoreResult(run_id, final, scored.rows, float(manifest["finished_at"]) - started_at, manifest)  # type: ignore[arg-type]


def _write(
    path: Path,
    batches: Iterator[pa.RecordBatch],
    mapper: ColumnMapper,
    *,
    model: OnnxModel,
    keep: Sequence[str],
    bar: Progress,
    after_chunk: Callable[[int], None] | None,
) -> _Scored:
    """Score chunk by chunk into one Parquet file; memory follows the chunk size."""
    writer: pq.ParquetWriter | None = None
    rows = 0
    null_inputs = np.zeros(mapper.width, dtype=np.int64)
    parts: list[np.ndarray] = []
    try:
        for batch in batches:
            if len(batch) == 0:
                continue
            features = mapper.array(batch)
            null_inputs += mapper.null_counts(batch)
            outputs = model.run({mapper.input_name: features})
            table = _output_table(batch, keep, model.output_names, outputs)
            if writer is None:
                # Scores and ids are nearly all distinct: dictionary encoding would only cost time.
                writer = pq.ParquetWriter(path, table.schema, use_dictionary=False)
            writer.write_table(table)
            parts.append(outputs[0].reshape(len(features), -1)[:, 0].astype(np.float32))
            rows += len(features)
            bar.update(rows)
            if after_chunk is not None:
                after_chunk(rows)
    finally:
        if writer is not None:
            writer.close()
    bar.update(rows, final=True)
    if writer is None:
        raise InvalidInput("the input has no rows")
    return _Scored(rows, np.concatenate(parts), null_inputs)


def _feature_names(mapper: ColumnMapper) -> list[str]:
    if mapper.list_column:
        return [f"{mapper.columns[0]}[{i}]" for i in range(mapper.width)]
    return list(mapper.columns)


def _output_table(
    batch: pa.RecordBatch, keep: Sequence[str], names: Sequence[str], outputs: Sequence[np.ndarray]
) -> pa.Table:
    columns: dict[str, pa.Array] = {name: batch.column(name) for name in keep}
    for name, value in zip(names, outputs, strict=True):
        flat = value.reshape(len(value), -1)
        if flat.shape[1] == 1:
            columns[name] = pa.array(flat[:, 0])
        else:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    return pa.table(columns)


def _schema(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]
