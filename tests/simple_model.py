"""Triton's `simple` example model as ONNX: INPUT0 + INPUT1 -> OUTPUT0, INPUT0 - INPUT1 -> OUTPUT1.

INT32 tensors of shape [batch, 16], the model Triton's example clients call, so those clients
run against the gateway with no change but the address.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8


def write_simple(root: Path, endpoint: str = "simple", version: str = "1") -> str:
    """Write root/<endpoint>/<version>/model.onnx with its manifest; returns the sha256."""
    shape: list[str | int | None] = ["batch", 16]
    graph = helper.make_graph(
        nodes=[
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        name=f"{endpoint}-{version}",
        inputs=[helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("INPUT0", "INPUT1")],
        outputs=[helper.make_tensor_value_info(n, TensorProto.INT32, shape) for n in ("OUTPUT0", "OUTPUT1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    data = model.SerializeToString(deterministic=True)
    directory = root / endpoint / version
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (directory / "manifest.yaml").write_text(f"format: onnx\nfile: model.onnx\nsha256: {digest}\n")
    return digest
