"""Write the batch playbook's demo inputs, deterministically: three nights of customers to score.

`make demo-data` (or `python models/make_demo_data.py [DIR]`, default `var/demo`) writes:

- `nightly-2026-11-25.parquet`: a normal night, the run consumers read;
- `nightly-2026-11-26.parquet`: the next night after an upstream encoder change (the seed's
  example 3, "scores shifted because of a one-hot encoding change"): the categorical
  `segment` gained a category, so its one-hot block is one column wider and every numeric
  feature after it lands one column to the right. The file is well formed, the schema is the
  same, and nothing fails until the scores are compared: exactly what the batch gates are for;
- `nightly-2026-11-26-fixed.parquet`: the same customers as the 26th with the encoder fixed
  (the remediated re-run).

Each file has `customer_id` (string) and `features` (32 float32 values per row, the model's
input vector: 8 one-hot columns of `segment`, then 24 numeric features, which are not
standardised, as engineered features often are not). Scores from the demo model come out at
CTR scale and right-skewed (mean about 2.5%, p99 about 14%).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 20_000
SEGMENTS = np.array([0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02])  # how common each segment is
NUMERIC = 24
FEATURES = len(SEGMENTS) + NUMERIC
#: file name -> (the night's seed, whether the encoder has the extra category)
NIGHTS = {
    "nightly-2026-11-25.parquet": (25, False),
    "nightly-2026-11-26.parquet": (26, True),
    "nightly-2026-11-26-fixed.parquet": (26, False),
}


def night(seed: int, *, shifted: bool, rows: int = ROWS) -> pa.Table:
    """One night's customers; `shifted` encodes `segment` with the extra (unused) category first."""
    shape = np.random.default_rng(0)  # the features' means and spreads: the same every night
    means = shape.uniform(-1.0, 1.0, size=NUMERIC)
    spreads = shape.uniform(0.5, 1.5, size=NUMERIC)
    rng = np.random.default_rng(seed)
    numeric = (rng.normal(size=(rows, NUMERIC)) * spreads + means).astype(np.float32)
    segment = rng.choice(len(SEGMENTS), size=rows, p=SEGMENTS)
    width = len(SEGMENTS) + (1 if shifted else 0)
    one_hot = np.zeros((rows, width), dtype=np.float32)
    one_hot[np.arange(rows), segment + (1 if shifted else 0)] = 1.0
    features = np.concatenate([one_hot, numeric], axis=1)[:, :FEATURES]  # the vector keeps its 32 slots
    ids = pa.array([f"c{seed:02d}{i:06d}" for i in range(rows)])
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), FEATURES)
    return pa.table({"customer_id": ids, "features": vectors})


def write(directory: Path) -> list[Path]:
    """Write every night's file under `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (seed, shifted) in NIGHTS.items():
        path = directory / name
        pq.write_table(night(seed, shifted=shifted), path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("var/demo")
    for written in write(target):
        print(f"wrote {written} ({ROWS:,} customers)")
