"""Build `ranker-xl`, a heavier ranker for throughput work, into a scratch directory.

A 32 -> 1024 -> 1024 -> 1 MLP (ReLU, sigmoid): about 1.1 M weights (4.3 MB), so one
batch-1 run costs a few hundred microseconds on a CPU core where the bundled `ctr-ranker`
costs a few. It takes the same input (`features` [batch, 32]) and gives the same output
(`score` [batch, 1]), so every client of the demo can call it. It is not shipped: the
benchmarks build it (deterministically, byte for byte) into a temporary directory, and
`python models/make_heavy_model.py DIR` builds it for you with a route file `DIR/gateway.yaml`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 32
HIDDEN = 1024
OPSET = 17
IR_VERSION = 8
ENDPOINT = "ranker-xl"
VERSION = "1.0"

ROUTE_FILE = f"""\
# Written by models/make_heavy_model.py.
model_root: .
endpoints:
  {ENDPOINT}:
    versions: ["{VERSION}"]
    traffic: {{"{VERSION}": 100}}
    labels: {{stable: "{VERSION}"}}
    max_batch_size: 256
"""


def build(hidden: int = HIDDEN) -> onnx.ModelProto:
    """The model, from a fixed seed (`hidden` units in each hidden layer)."""
    rng = np.random.default_rng(4096)
    w1 = rng.normal(0.0, (2 / FEATURES) ** 0.5, size=(FEATURES, hidden)).astype(np.float32)
    b1 = np.zeros(hidden, dtype=np.float32)
    w2 = rng.normal(0.0, (2 / hidden) ** 0.5, size=(hidden, hidden)).astype(np.float32)
    b2 = np.zeros(hidden, dtype=np.float32)
    w3 = rng.normal(0.0, (1 / hidden) ** 0.5, size=(hidden, 1)).astype(np.float32)
    b3 = np.array([-3.0], dtype=np.float32)
    graph = helper.make_graph(
        nodes=[
            helper.make_node("Gemm", ["features", "w1", "b1"], ["h1_pre"]),
            helper.make_node("Relu", ["h1_pre"], ["h1"]),
            helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2_pre"]),
            helper.make_node("Relu", ["h2_pre"], ["h2"]),
            helper.make_node("Gemm", ["h2", "w3", "b3"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["score"]),
        ],
        name=f"{ENDPOINT}-{VERSION}",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURES])],
        outputs=[helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(array, name)
            for name, array in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3))
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="model-gateway-demo",
        producer_version="1",
        doc_string=f"Heavier ranker for throughput benchmarks ({FEATURES} -> {hidden} -> {hidden} -> 1)",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write(root: Path, hidden: int = HIDDEN) -> Path:
    """Write root/ranker-xl/1.0/{model.onnx,manifest.yaml} and root/gateway.yaml; returns the route file.

    `hidden` widens the hidden layers (the benchmarks also run a 2048-wide variant).
    """
    directory = root / ENDPOINT / VERSION
    directory.mkdir(parents=True, exist_ok=True)
    data = build(hidden).SerializeToString(deterministic=True)
    (directory / "model.onnx").write_bytes(data)
    (directory / "manifest.yaml").write_text(
        "# Written by models/make_heavy_model.py; artifacts are immutable.\n"
        "format: onnx\n"
        "file: model.onnx\n"
        f"sha256: {hashlib.sha256(data).hexdigest()}\n"
        f"description: heavier ranker ({FEATURES} -> {hidden} -> {hidden} -> 1 MLP)\n"
    )
    route_file = root / "gateway.yaml"
    route_file.write_text(ROUTE_FILE)
    return route_file


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python models/make_heavy_model.py DIR")
    print(f"wrote {write(Path(sys.argv[1]))}")
