"""A merged run only where it can be split back exactly; otherwise each request runs alone.

`run_batch` straight on real onnxruntime models (no server): each request of a batch must get
what it would have got alone, for models whose inputs or outputs do not line up row by row.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from gateway.admission import Admission
from gateway.batcher import Result, _alone, _Entry, run_batch
from gateway.runner import ModelRunner
from gateway.runtime import OnnxModel
from testkit.gateways import predict_request, running_gateway, tensor
from tests.simple_model import write_simple

OPSET = [helper.make_opsetid("", 13)]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def entries(
    loop: asyncio.AbstractEventLoop, admission: Admission, *requests: tuple[dict[str, np.ndarray], tuple[str, ...]]
) -> list[_Entry]:
    """Queued requests as the batcher holds them (rows: the first input's, as the gateway counts them)."""
    return [
        _Entry(
            feeds, wanted, next(iter(feeds.values())).shape[0], admission.admit("e", "v"), None, loop.create_future()
        )
        for feeds, wanted in requests
    ]


def outcome(result: Result | BaseException) -> object:
    """What a request got: its outputs as lists, or its error's type."""
    if isinstance(result, BaseException):
        return type(result)
    return [array.tolist() for array in result[0]]


def test_requests_whose_inputs_disagree_on_rows_never_share_a_run(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    write_simple(tmp_path)  # INPUT0 + INPUT1 -> OUTPUT0, both [batch, 16] INT32
    model = OnnxModel(tmp_path / "simple" / "1" / "model.onnx", source="simple 1")
    admission = Admission(10)
    wanted = ("OUTPUT0",)
    a = {"INPUT0": np.full((2, 16), 1, np.int32), "INPUT1": np.full((3, 16), 10, np.int32)}
    b = {"INPUT0": np.full((3, 16), 100, np.int32), "INPUT1": np.full((2, 16), 1000, np.int32)}
    good = {"INPUT0": np.full((1, 16), 5, np.int32), "INPUT1": np.full((1, 16), 7, np.int32)}
    batch = entries(loop, admission, (a, wanted), (b, wanted), (good, wanted), (good, wanted))
    # Concatenated, a's and b's mismatches cancel out (5 rows each) and the run would succeed,
    # handing b a row of a's INPUT1; alone, each is refused by the model.
    results = run_batch(model, batch, admission.left)
    assert [outcome(r) for r in results] == [outcome(_alone(model, e, admission.left)) for e in batch]
    assert all(isinstance(r, BaseException) for r in results[:2])
    assert outcome(results[2]) == [[[12] * 16]]
    shared = [r[1] for r in results[2:] if not isinstance(r, BaseException)]
    assert shared == [2, 2]  # the two well-formed requests still shared one run


def test_outputs_that_are_not_one_row_per_input_row_are_not_split(loop: asyncio.AbstractEventLoop) -> None:
    # NonZero: one output row per non-zero input value (detections-like), not per input row.
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["X"], ["S"]), helper.make_node("Transpose", ["S"], ["Y"], perm=[1, 0])],
        "detections",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.INT64, ["M", 2])],
    )
    onnx_model = helper.make_model(graph, opset_imports=OPSET)
    onnx_model.ir_version = 8
    model = OnnxModel(onnx_model.SerializeToString(), source="detections 1")
    assert model.batchable  # every dimension says "batch": only the outputs show it is not
    admission = Admission(10)
    first, second = np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32)
    first[1, 1], second[1, 0] = 1, 1
    batch = entries(loop, admission, ({"X": first}, ("Y",)), ({"X": second}, ("Y",)))
    results = run_batch(model, batch, admission.left)
    assert [outcome(r) for r in results] == [[[[1, 1]]], [[[1, 0]]]]  # each its own detection, as alone


def test_a_model_with_a_free_inner_dimension_runs_off_the_loop() -> None:
    # [N, L]: a sequence length; the cost measured at L = 1 says nothing about L = 1500.
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["X"], ["Y"], keepdims=1)],
        "sequences",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
    )
    onnx_model = helper.make_model(graph, opset_imports=OPSET)
    onnx_model.ir_version = 8
    model = OnnxModel(onnx_model.SerializeToString(), source="sequences 1")
    model.measure_cost()
    runner = ModelRunner()
    runner.start()
    try:
        assert model.dynamic_inner and runner.off_loop(model, 1, "auto")
        assert not runner.off_loop(model, 1, "inline")
        assert "free dimension besides the batch" in runner.describe("sequences", "1", model)
    finally:
        runner.shutdown()


def fixed_to_one_row() -> bytes:
    """Declares a free batch dimension but reshapes to one row inside (a common export mistake)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "shape"], ["R"]), helper.make_node("Add", ["X", "R"], ["Y"])],
        "fixed",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        initializer=[shape],
    )
    onnx_model = helper.make_model(graph, opset_imports=OPSET)
    onnx_model.ir_version = 8
    return onnx_model.SerializeToString()


def test_an_export_that_only_runs_at_batch_one_loads_and_is_not_batched() -> None:
    model = OnnxModel(fixed_to_one_row(), source="fixed 1")
    assert model.batchable
    cost = model.measure_cost()  # batch 1 works, 32 rows fail: measured at batch 1, no merging
    assert not model.batchable and cost.per_row_seconds == 0 and cost.first_row_seconds > 0


def test_batching_configured_for_a_model_that_cannot_merge_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = fixed_to_one_row()
    (tmp_path / "fixed" / "1").mkdir(parents=True)
    (tmp_path / "fixed" / "1" / "model.onnx").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "fixed" / "1" / "manifest.yaml").write_text(f"format: onnx\nfile: model.onnx\nsha256: {digest}\n")
    routes = f"""
model_root: {tmp_path}
endpoints:
  fixed:
    versions: ["1"]
    traffic: {{"1": 100}}
    labels: {{stable: "1"}}
    batching: {{max_batch_size: 8, max_delay_ms: 5}}
"""
    with caplog.at_level(logging.WARNING, logger="gateway"), running_gateway(routes, model_root=tmp_path) as gw:
        x = np.ones((1, 4), np.float32)
        response = gw.predict_stub.Predict(predict_request("fixed", inputs=[tensor("X", x)]), timeout=30)
        assert response.version == "1"
    notes = [r.getMessage() for r in caplog.records if "cannot merge requests" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("fixed 1: batching is configured")
