"""Build the bundled demo endpoint `ctr-ranker` deterministically with the onnx helper API.

A tabular click-through-rate MLP: 32 float features `features` [batch, 32] -> 16 ReLU units
-> click probability `score` [batch, 1] (sigmoid). Versions share a base set of weights and
differ by small, seeded perturbations, so their scores are close but not equal, as
successive retrains of one model are. Run `make models` (or this file) to rebuild; the bytes
and the sha256 in each manifest are the same on every run.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 32
HIDDEN = 16
OPSET = 17
IR_VERSION = 8
ENDPOINT = "ctr-ranker"
# version -> (perturbation seed, perturbation scale, output bias shift). 1.15 is not in the route
# file: it is the "green" build the blue-green playbook loads at run time.
VERSIONS = {
    "1.12": (112, 0.00, 0.00),
    "1.13": (113, 0.05, -0.10),
    "1.14": (114, 0.08, 0.05),
    "1.15": (115, 0.04, 0.02),
}


def build(version: str) -> onnx.ModelProto:
    base = np.random.default_rng(2024)
    w1 = base.normal(0.0, 0.18, size=(FEATURES, HIDDEN)).astype(np.float32)
    b1 = base.normal(0.0, 0.1, size=(HIDDEN,)).astype(np.float32)
    w2 = base.normal(0.0, 0.3, size=(HIDDEN, 1)).astype(np.float32)
    b2 = np.array([-3.2], dtype=np.float32)  # a base CTR of a few percent
    seed, scale, shift = VERSIONS[version]
    tweak = np.random.default_rng(seed)
    w1 = (w1 + tweak.normal(0.0, scale, size=w1.shape)).astype(np.float32)
    w2 = (w2 + tweak.normal(0.0, scale, size=w2.shape)).astype(np.float32)
    b2 = (b2 + shift).astype(np.float32)

    graph = helper.make_graph(
        nodes=[
            helper.make_node("Gemm", ["features", "w1", "b1"], ["hidden_pre"]),
            helper.make_node("Relu", ["hidden_pre"], ["hidden"]),
            helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["score"]),
        ],
        name=f"{ENDPOINT}-{version}",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURES])],
        outputs=[helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="model-gateway-demo",
        producer_version="1",
        doc_string=f"Demo click-through-rate ranker {version}",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def write(root: Path) -> dict[str, str]:
    """Write every version under root/ctr-ranker/<version>/ and return version -> sha256."""
    digests = {}
    for version in VERSIONS:
        directory = root / ENDPOINT / version
        directory.mkdir(parents=True, exist_ok=True)
        data = build(version).SerializeToString(deterministic=True)
        (directory / "model.onnx").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (directory / "manifest.yaml").write_text(
            f"# Written by models/make_demo_models.py; artifacts are immutable.\n"
            f"format: onnx\n"
            f"file: model.onnx\n"
            f"sha256: {digest}\n"
            f"description: demo CTR ranker {version} ({FEATURES} features -> click probability)\n"
        )
        digests[version] = digest
    return digests


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for version, digest in write(target).items():
        print(f"{ENDPOINT} {version} sha256={digest}")
