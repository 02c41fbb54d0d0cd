"""`OnnxModel`: one onnxruntime session with its IO signature, warm-up and run.

This is the only module that imports onnxruntime, so the rest of the gateway (and its
fault-injection tests) deal with a small, typed surface.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.errors import ArtifactError
from gateway.tensors import DataType, TensorSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
}


def _spec(arg: ort.NodeArg, *, source: str) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        supported = ", ".join(sorted(_ORT_TYPES))
        raise ArtifactError(f"{source}: tensor {arg.name!r} has type {arg.type}; supported: {supported}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


@dataclass(frozen=True, slots=True)
class RunCost:
    """What one run of a model costs on this host, measured after warm-up: the first row and each one after.

    Zero until measured. Used to keep cheap runs on the event loop and send costly ones to
    the runner pool (`gateway.runner`), whatever the rows of the run.
    """

    first_row_seconds: float = 0.0
    per_row_seconds: float = 0.0

    def seconds(self, rows: int) -> float:
        """Estimated seconds of a run over `rows` rows."""
        return self.first_row_seconds + self.per_row_seconds * max(rows - 1, 0)

    def describe(self) -> str:
        """`63 us per batch-1 run, +22 us per extra row`."""
        first, per_row = self.first_row_seconds * 1e6, self.per_row_seconds * 1e6
        return f"{first:.0f} us per batch-1 run, +{per_row:.1f} us per extra row"


def _row_width(shape: tuple[int | None, ...]) -> int:
    width = 1
    for dim in shape[1:]:
        width *= dim or 1
    return width


class OnnxModel:
    """An onnxruntime session over one immutable model (its verified bytes), plus its IO signature.

    `run` is safe to call from several threads at once (onnxruntime sessions are), and
    releases the GIL while the graph executes.
    """

    def __init__(self, model: bytes | Path, *, source: str, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.source = source
        try:
            # A path, not bytes, for files: onnxruntime reads it natively, without a second copy in
            # Python memory or a long GIL-holding conversion that would stall the serving loop.
            loaded = str(model) if isinstance(model, Path) else model
            self._session = ort.InferenceSession(loaded, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several unrelated types for bad files
            raise ArtifactError(f"{source}: onnxruntime cannot load this model: {err}") from err
        self.inputs: tuple[TensorSpec, ...] = tuple(_spec(a, source=source) for a in self._session.get_inputs())
        self.outputs: tuple[TensorSpec, ...] = tuple(_spec(a, source=source) for a in self._session.get_outputs())
        self.output_names: tuple[str, ...] = tuple(o.name for o in self.outputs)
        # Float inputs and how many features each row carries (for NaN counts per feature).
        self.float_inputs: tuple[tuple[str, int], ...] = tuple(
            (spec.name, _row_width(spec.shape)) for spec in self.inputs if spec.datatype.numpy.kind == "f"
        )
        self.feature_count = sum(width for _, width in self.float_inputs)
        self.feature_names: tuple[str, ...] = tuple(
            name if width == 1 else f"{name}[{i}]" for name, width in self.float_inputs for i in range(width)
        )
        #: Whether every input and output has a free first (batch) dimension: requests can be merged.
        self.batchable = all(spec.batched for spec in (*self.inputs, *self.outputs))
        #: Whether an input has a free dimension besides the first (a sequence length): the measured
        #: cost, taken at size 1 there, does not bound a run's cost.
        self.dynamic_inner = any(d is None for spec in self.inputs for d in spec.shape[1:])
        self.cost = RunCost()
        # onnxruntime's public `run` is a Python wrapper that re-checks the input names (the
        # gateway's checks already did) and GPU graph capture before calling the session's
        # native `run`: several Python calls per request, 5% of the gateway's CPU per request
        # on the demo model. Call the native entry point when this onnxruntime has it.
        native = getattr(self._session, "_sess", None)
        self._run = native.run if native is not None and callable(getattr(native, "run", None)) else self._public_run

    def _public_run(
        self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], run_options: None
    ) -> list[np.ndarray]:
        result: list[np.ndarray] = self._session.run(list(output_names), feeds, run_options)
        return result

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] = ()) -> list[np.ndarray]:
        """Run the graph; returns the outputs in the order of `output_names` (all when empty)."""
        result: list[np.ndarray] = self._run(output_names or self.output_names, feeds, None)
        return result

    def _zeros(self, batch_size: int) -> dict[str, np.ndarray]:
        return {
            spec.name: np.zeros([batch_size if d is None else d for d in spec.shape], dtype=spec.datatype.numpy)
            for spec in self.inputs
        }

    def warm_up(self, *, batch_size: int = 1, rounds: int = 3) -> float:
        """Run zero inputs a few times so the first real request pays no lazy setup; returns seconds."""
        feeds = self._zeros(batch_size)
        started = time.perf_counter()
        for _ in range(rounds):
            self.run(feeds)
        return time.perf_counter() - started

    def measure_cost(self, *, rows: int = 32, rounds: int = 7) -> RunCost:
        """Time runs of 1 and `rows` rows, keep the result as `cost` and return it.

        The fastest of `rounds` runs: on a busy host the others measure the neighbours' work.
        """

        def fastest(batch_size: int) -> float:
            feeds = self._zeros(batch_size)
            self.run(feeds)
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                self.run(feeds)
                samples.append(time.perf_counter() - started)
            return min(samples)

        first = fastest(1)
        per_row = 0.0
        if self.batchable and rows > 1:
            try:
                per_row = max(fastest(rows) - first, 0.0) / (rows - 1)
            except Exception as err:  # onnxruntime raises several types: an export that only runs at batch 1
                log.warning(
                    "%s declares a free batch dimension but fails at %d rows: not batched (%s)", self.source, rows, err
                )
                self.batchable = False
        self.cost = RunCost(first, per_row)
        return self.cost
