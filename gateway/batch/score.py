"""`score`: run a model version over a table in chunks and write an immutable, versioned output.

Input is Parquet or CSV, read in record batches so memory follows the chunk size, not the
file size. The model's input is a fixed-size list column named like the input, or the
table's numeric columns in order (`columns` chooses). The output goes to a hidden
`.RUN.partial` directory and is renamed to `ROOT/ENDPOINT/RUN/` only once the predictions and
the manifest (with their sha256) are complete: a crash leaves no publishable run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def _parquet_rows(path: Path) -> int | None:
    if path.suffix.lower() in (".parquet", ".pq"):
        return int(pq.ParquetFile(path).metadata.num_rows)
    return None


def _row_count(path: Path) -> int:
    """The input's rows, read apart from the scoring loop, so the row_count gate can catch lost rows."""
    rows = _parquet_rows(path)
    if rows is not None:
        return rows
    # One column is enough to count CSV rows, and converts far less than the scoring read.
    first = pcsv.open_csv(path).schema.names[:1]
    reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(include_columns=first))
    return sum(len(batch) for batch in reader)


def _numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _is_list(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))


class ColumnMapper:
    """Turns a record batch into the model's input array.

    The input is one numeric list column of `width` values per row, or `width` numeric columns;
    anything else is refused here, before any row is read, with the column and its type named.
    """

    def __init__(self, schema: pa.Schema, input_name: str, width: int, columns: Sequence[str] = ()) -> None:
        self.input_name = input_name
        names = list(schema.names)
        if columns:
            missing = [c for c in columns if c not in names]
            if missing:
                raise InvalidInput(f"--columns names {missing} not in the input; columns: {', '.join(names)}")
            self.columns = list(columns)
        elif input_name in names and _is_list(schema.field(input_name).type):
            self.columns = [input_name]
        else:
            self.columns = [f.name for f in schema if _numeric(f.type)]
        kinds = [schema.field(c).type for c in self.columns]
        self.list_column = len(kinds) == 1 and _is_list(kinds[0])
        self.width = width
        expected = f"{width} numbers per row: a list column of {width} numbers, or {width} numeric columns"
        if self.list_column:
            kind = kinds[0]
            if not _numeric(kind.value_type) or (pa.types.is_fixed_size_list(kind) and kind.list_size != width):
                raise InvalidInput(
                    f"column {self.columns[0]!r} is {kind}, but the model input {input_name!r} takes {expected}"
                )
            return
        wrong = [(c, k) for c, k in zip(self.columns, kinds, strict=True) if not _numeric(k)]
        if wrong:
            column, kind = wrong[0]
            raise InvalidInput(f"column {column!r} is {kind}, but the model input {input_name!r} takes {expected}")
        if len(self.columns) != width:
            raise InvalidInput(
                f"the model input {input_name!r} takes {width} features per row, but {len(self.columns)} numeric "
                f"columns were found ({', '.join(self.columns[:6])}{'...' if len(self.columns) > 6 else ''}); "
                f"use --columns, or a list column named {input_name!r}"
            )

    def _flat(self, column: pa.Array) -> pa.Array:
        """A list column's values, [rows x width] of them (variable-size lists are checked per batch)."""
        flat = column.flatten()
        if len(flat) != len(column) * self.width or (
            not pa.types.is_fixed_size_list(column.type)
            and pc.min_max(pc.list_value_length(column)).as_py() != {"min": self.width, "max": self.width}
        ):
            raise InvalidInput(
                f"column {self.columns[0]!r} has a null or a list that is not {self.width} values long; "
                f"the model input {self.input_name!r} takes {self.width} numbers per row"
            )
        return flat

    def null_counts(self, batch: pa.RecordBatch) -> np.ndarray:
        """Missing (null) input values per feature in this batch, from Arrow's null bitmaps (no scan)."""
        if self.list_column:
            column = batch.column(self.columns[0])
            flat = self._flat(column)
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
            values = self._flat(column).to_numpy(zero_copy_only=False).astype(np.float32)
            result: np.ndarray = values.reshape(len(column), self.width)
            return result
        return np.column_stack(
            [batch.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in self.columns]
        )


class Progress:
    """A progress line on stderr with rows/s, when `enabled` (the CLI enables it only on a terminal)."""

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


def score(request: ScoreRequest, repository: ModelRepository) -> ScoreResult:
    """Score the input with one version; returns the finished run."""
    started_at = time.time()
    run_id = check_run_id(request.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at)))
    base = request.output_root / request.endpoint
    final = base / run_id
    if final.exists():
        raise AlreadyExists(f"{final} exists; runs are immutable: choose a new --run-id")
    model = repository.load_verified(request.artifact, lambda path: OnnxModel(path, source=request.artifact.path))
    if len(model.inputs) != 1 or len(model.float_inputs) != 1:
        signature = ", ".join(f"{s.name} {s.describe()}" for s in model.inputs)
        raise InvalidInput(f"{request.endpoint} {request.version} takes {signature}; batch takes one float input")
    input_name, width = model.float_inputs[0]
    schema, batches = _batches(request.input_path, request.chunk_rows)
    mapper = ColumnMapper(schema, input_name, width, request.columns)
    missing = [c for c in request.keep_columns if c not in schema.names]
    if missing:
        raise InvalidInput(f"--keep-columns {missing} are not in the input; columns: {', '.join(schema.names)}")
    partial = base / f".{run_id}.partial"
    if partial.exists():
        shutil.rmtree(partial)  # the leftovers of a crashed attempt are never published
    partial.mkdir(parents=True)
    try:
        manifest = _score_into(partial, request, model, mapper, batches, run_id=run_id, started_at=started_at)
        os.rename(partial, final)  # atomic: the run appears whole or not at all
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed run leaves nothing behind (a kill still may)
        raise
    rows = int(manifest["output"]["rows"])
    return ScoreResult(run_id, final, rows, float(manifest["finished_at"]) - started_at, manifest)


def _score_into(
    partial: Path,
    request: ScoreRequest,
    model: OnnxModel,
    mapper: ColumnMapper,
    batches: Iterator[pa.RecordBatch],
    *,
    run_id: str,
    started_at: float,
) -> dict[str, Any]:
    """Write the predictions and their manifest into `partial`; returns the manifest."""
    bar = Progress(_parquet_rows(request.input_path), request.progress)
    # Hash (and count) the input beside the scoring (hashlib releases the GIL): both are ready when scoring ends.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-sha256") as hasher:
        input_digest = hasher.submit(file_sha256, request.input_path)
        input_rows = hasher.submit(_row_count, request.input_path)
        scored = _write(partial / PREDICTIONS, batches, mapper, model=model, keep=request.keep_columns, bar=bar)
        input_sha256 = input_digest.result()
    feature_names = model.feature_names if mapper.list_column else mapper.columns
    manifest = {
        "endpoint": request.endpoint,
        "run_id": run_id,
        "model": {"version": request.version, "path": request.artifact.path, "sha256": request.artifact.sha256},
        "input": {
            "path": str(request.input_path.resolve()),
            "sha256": input_sha256,
            "rows": input_rows.result(),
        },
        "input_columns": mapper.columns,
        "input_null_counts": {n: int(c) for n, c in zip(feature_names, scored.null_inputs, strict=True)},
        "output": {
            "file": PREDICTIONS,
            "sha256": file_sha256(partial / PREDICTIONS),
            "rows": scored.rows,
            "schema": _schema(pq.read_schema(partial / PREDICTIONS)),
            "score_column": model.output_names[0],
        },
        "score_summary": _summary(scored.scores),
        "started_at": started_at,
        "finished_at": time.time(),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return manifest


def _write(
    path: Path,
    batches: Iterator[pa.RecordBatch],
    mapper: ColumnMapper,
    *,
    model: OnnxModel,
    keep: Sequence[str],
    bar: Progress,
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
    except pa.ArrowInvalid as err:  # a value the reader or writer cannot convert, found mid-file
        raise InvalidInput(f"the input cannot be read as the model's features: {err}") from None
    finally:
        if writer is not None:
            writer.close()
    bar.update(rows, final=True)
    if writer is None:
        raise InvalidInput("the input has no rows")
    return _Scored(rows, np.concatenate(parts), null_inputs)


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
