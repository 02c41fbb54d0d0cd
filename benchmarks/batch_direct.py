"""The baseline for batch scoring: read the same Parquet batches and call onnxruntime directly.

Usage: python -m benchmarks.batch_direct INPUT.parquet MODEL.onnx CHUNK_ROWS  (prints JSON: rows, seconds, peak_mb)
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq

from benchmarks.common import peak_rss_mb


def main(path: str, model: str, chunk_rows: int) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=chunk_rows):
        x = np.column_stack([batch.column(i).to_numpy().astype(np.float32) for i in range(1, batch.num_columns)])
        session.run(None, {"features": x})
        rows += len(x)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
