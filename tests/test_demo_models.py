from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq

from testkit.gateways import MODELS


def _generator(name: str = "make_demo_models") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, MODELS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_the_bundled_files(tmp_path: Path) -> None:
    digests = _generator().write(tmp_path)
    assert set(digests) == {"1.12", "1.13", "1.14", "1.15"}  # 1.15: the blue-green playbook's green build
    for version, digest in digests.items():
        bundled = MODELS / "ctr-ranker" / version
        assert (tmp_path / "ctr-ranker" / version / "model.onnx").read_bytes() == (bundled / "model.onnx").read_bytes()
        assert f"sha256: {digest}" in (bundled / "manifest.yaml").read_text()


def test_demo_signature_and_versions_differ_slightly() -> None:
    x = np.random.default_rng(1).normal(size=(256, 32)).astype(np.float32)
    results = {}
    for version in ("1.12", "1.13", "1.14", "1.15"):
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


def test_demo_data_is_deterministic_and_the_gates_see_the_one_hot_shift(tmp_path: Path) -> None:
    from gateway.batch.gates import Run
    from gateway.batch.pointer import BatchPointers
    from gateway.batch.score import ScoreRequest, score
    from gateway.config import BatchGatesConfig
    from gateway.repository import ModelRepository
    from gateway.state.sqlite import SqliteStore

    data = _generator("make_demo_data")
    paths = {p.name: p for p in data.write(tmp_path / "demo")}
    assert data.night(26, shifted=True).equals(data.night(26, shifted=True))
    assert (
        pq.read_table(paths["nightly-2026-11-26.parquet"]).schema
        == pq.read_table(paths["nightly-2026-11-25.parquet"]).schema
    )  # the shift is invisible to the schema: only the scores show it
    repository = ModelRepository(MODELS)
    store = SqliteStore(tmp_path / "state.db")
    pointers = BatchPointers(store)
    runs = {}
    for name, path in paths.items():
        run_id = name.removeprefix("nightly-").removesuffix(".parquet")
        request = ScoreRequest(
            "ctr-ranker", "1.13", repository.from_manifest("ctr-ranker", "1.13"), path, tmp_path / "out",
            run_id=run_id, keep_columns=("customer_id",),
        )  # fmt: skip
        runs[run_id] = Run.load(score(request, repository).path)
    summary = runs["2026-11-25"].manifest["score_summary"]
    assert 0.01 < summary["mean"] < 0.05 and summary["p99"] > 3 * summary["p50"]  # CTR scale, right-skewed
    pointers.publish("nightly", "ctr-ranker", runs["2026-11-25"], BatchGatesConfig())
    bad = {g.name: g for g in pointers.validate("ctr-ranker", runs["2026-11-26"], BatchGatesConfig())}
    assert bad["schema"].passed
    assert not bad["ks_statistic"].passed and not bad["mean_shift"].passed
    fixed = pointers.validate("ctr-ranker", runs["2026-11-26-fixed"], BatchGatesConfig())
    assert all(g.passed for g in fixed), fixed
    store.close()


def test_heavier_model_builds_the_same_bytes_into_a_scratch_directory(tmp_path: Path) -> None:
    from gateway.desired import desired_from_config, load_route_file
    from gateway.repository import ModelRepository

    spec = importlib.util.spec_from_file_location("make_heavy_model", MODELS / "make_heavy_model.py")
    assert spec and spec.loader
    heavy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(heavy)
    first, second = heavy.write(tmp_path / "a"), heavy.write(tmp_path / "b")
    model = Path("ranker-xl") / "1.0" / "model.onnx"
    assert (first.parent / model).read_bytes() == (second.parent / model).read_bytes()
    config = load_route_file(first)
    state = desired_from_config(config, ModelRepository(config.model_root))  # the manifest's digest matches
    session = ort.InferenceSession(str(first.parent / model), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"features": np.ones((4, 32), np.float32)})[0]
    assert scores.shape == (4, 1) and state.endpoints["ranker-xl"].weights == {"1.0": 100}
