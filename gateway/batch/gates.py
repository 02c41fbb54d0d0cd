"""Validation gates a batch run must pass before the read pointer moves to it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gateway.batch.score import MANIFEST
from gateway.config import BatchGatesConfig
from gateway.errors import ArtifactError, NotFound
from gateway.repository import file_sha256


@dataclass(frozen=True)
class Gate:
    """One gate: its value against its threshold (`percent`: both are shares, shown as per cent)."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool
    detail: str = ""
    percent: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def shown(self, *, threshold: bool = False) -> str:
        """The value (or the threshold) for people: 4 significant digits, `-` when there is none."""
        value = self.threshold if threshold else self.value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if self.percent:
            return f"{value * 100:+.1f}%" if not threshold else f"±{value * 100:g}%"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    def refusal(self) -> str:
        """Why this gate failed, in a few words: its value against its limit, or what differs."""
        if self.value is None:
            return f"{self.name}: {self.detail}"
        return f"{self.name} {self.shown()} (limit {self.shown(threshold=True)})"


@dataclass(frozen=True)
class Run:
    """A finished batch run on disk: its directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> Run:
        """Read a run's manifest (NotFound when the run is missing or unfinished)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise NotFound(f"{path} is not a finished batch run (no {MANIFEST}); a crashed score leaves none")
        return cls(path, json.loads(manifest_path.read_text()))

    @property
    def run_id(self) -> str:
        """The run's id."""
        return str(self.manifest["run_id"])

    @property
    def predictions(self) -> Path:
        """The predictions file."""
        return self.path / str(self.manifest["output"]["file"])

    def verify(self) -> None:
        """ArtifactError unless the manifest is in place and the predictions file matches its digest."""
        if not (self.path / MANIFEST).is_file():
            raise ArtifactError(f"{self.path} is missing (no {MANIFEST}): the run's directory was moved or deleted")
        if not self.predictions.is_file():
            raise ArtifactError(f"{self.predictions} is missing; this run cannot be published or pointed to")
        actual = file_sha256(self.predictions)
        if actual != self.manifest["output"]["sha256"]:
            raise ArtifactError(
                f"{self.predictions} has sha256 {actual[:12]}, but its manifest records "
                f"{self.manifest['output']['sha256'][:12]}: the output was changed or corrupted after scoring"
            )

    def score_column(self) -> np.ndarray:
        """The model's first output as float64 (nulls as NaN)."""
        column = pq.read_table(self.predictions, columns=[self.manifest["output"]["score_column"]]).column(0)
        values: np.ndarray = column.to_numpy(zero_copy_only=False).astype(np.float64)
        return values


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    if not len(a) or not len(b):
        return math.nan
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def evaluate_gates(run: Run, published: Run | None, settings: BatchGatesConfig) -> list[Gate]:
    """Every gate for `run`, compared with the currently published run when there is one."""
    gates: list[Gate] = []
    try:
        run.verify()
        gates.append(Gate("files_intact", None, None, True, "predictions match the manifest's sha256"))
    except ArtifactError as err:
        return [Gate("files_intact", None, None, False, err.message)]
    input_rows = int(run.manifest["input"]["rows"])
    output_rows = int(pq.ParquetFile(run.predictions).metadata.num_rows)
    detail = "output rows vs the input file's own row count"
    gates.append(Gate("row_count", output_rows, input_rows, output_rows == input_rows, detail))
    scores = run.score_column()
    nulls = int(np.count_nonzero(~np.isfinite(scores)))
    gates.append(Gate("no_null_scores", nulls, 0, nulls == 0, "scores that are null or NaN"))
    if settings.input_null_rate_max is not None:
        counts = run.manifest.get("input_null_counts", {})
        worst_name, worst = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
        rate = worst / input_rows if input_rows else 0.0
        limit = settings.input_null_rate_max
        gates.append(Gate("input_null_rate", rate, limit, rate <= limit, f"worst feature {worst_name}"))
    if published is None:
        gates.append(Gate("schema", None, None, True, "nothing published yet: no comparison"))
        return gates
    try:
        published.verify()
    except ArtifactError as err:
        # The run consumers read is damaged: there is nothing sound to compare with, and a good
        # new run is exactly what is needed, so the comparison gates step aside (and say why).
        gates.append(Gate("schema", None, None, True, f"no comparison: published {published.run_id} is damaged"))
        gates.append(Gate("published_intact", None, None, True, err.message))
        return gates
    difference = schema_difference(run.manifest["output"]["schema"], published.manifest["output"]["schema"])
    gates.append(
        Gate(
            "schema",
            None,
            None,
            not difference,
            f"same as {published.run_id}" if not difference else f"vs {published.run_id}: {difference}",
        )
    )
    reference = published.score_column()
    ks = ks_statistic(scores, reference)
    gates.append(Gate("ks_statistic", ks, settings.ks_max, ks < settings.ks_max, f"scores vs {published.run_id}"))
    gates.append(_mean_shift(scores, reference, published.run_id, settings))
    return gates


def schema_difference(run: list[dict[str, str]], published: list[dict[str, str]]) -> str:
    """What differs between two output schemas, in words ("" when they are the same)."""
    ours = {c["name"]: c["type"] for c in run}
    theirs = {c["name"]: c["type"] for c in published}
    parts = []
    missing = [f"{name} ({kind})" for name, kind in theirs.items() if name not in ours]
    extra = [f"{name} ({kind})" for name, kind in ours.items() if name not in theirs]
    retyped = [
        f"{name} {theirs[name]} -> {kind}" for name, kind in ours.items() if name in theirs and theirs[name] != kind
    ]
    if missing:
        parts.append(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if extra:
        parts.append(f"extra column{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
    if retyped:
        parts.append(f"retyped {', '.join(retyped)}")
    if not parts and [c["name"] for c in run] != [c["name"] for c in published]:
        parts.append(f"column order {', '.join(ours)} (published: {', '.join(theirs)})")
    return "; ".join(parts)


def _mean_shift(scores: np.ndarray, reference: np.ndarray, against: str, settings: BatchGatesConfig) -> Gate:
    """The mean score against the published run's: relative to its mean (default) or absolute."""
    ours, theirs = float(np.nanmean(scores)), float(np.nanmean(reference))
    limit = settings.mean_shift_max
    detail = f"mean {ours:.4g} vs {theirs:.4g} in {against}"
    if settings.mean_shift == "absolute":
        shift = ours - theirs
        return Gate("mean_shift", shift, limit, abs(shift) < limit, detail)
    if theirs == 0:
        detail += "; a relative shift from a zero mean is undefined: set batch_gates.mean_shift: absolute"
        return Gate("mean_shift", math.inf, limit, False, detail, percent=True)
    shift = (ours - theirs) / abs(theirs)
    return Gate("mean_shift", shift, limit, abs(shift) < limit, detail, percent=True)
