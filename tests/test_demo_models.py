from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort

from testkit.gateways import MODELS


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_models", MODELS / "make_demo_models.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_the_bundled_files(tmp_path: Path) -> None:
    digests = _generator().write(tmp_path)
    for version, digest in digests.items():
        bundled = MODELS / "ctr-ranker" / version
        assert (tmp_path / "ctr-ranker" / version / "model.onnx").read_bytes() == (bundled / "model.onnx").read_bytes()
        assert f"sha256: {digest}" in (bundled / "manifest.yaml").read_text()


def test_demo_signature_and_versions_differ_slightly() -> None:
    x = np.random.default_rng(1).normal(size=(256, 32)).astype(np.float32)
    results = {}
    for version in ("1.12", "1.13", "1.14"):
        path = MODELS / "ctr-ranker" / version / "model.onnx"
        assert path.stat().st_size < 16_000
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        (out,) = session.get_outputs()
        assert (inp.name, inp.type, inp.shape[1]) == ("features", "tensor(float)", 32)
        assert (out.name, out.shape[1]) == ("score", 1)
        results[version] = session.run(None, {"features": x})[0]
        assert ((results[version] > 0) & (results[version] < 1)).all()
    assert not np.allclose(results["1.12"], results["1.13"])
    assert np.corrcoef(results["1.12"].ravel(), results["1.14"].ravel())[0, 1] > 0.8
