"""The gateway installs beside the clients its users already have, and still works there.

One fresh virtual environment: the gateway first, then `pip install 'tritonclient[grpc]' kserve
mlserver` as users (and the README) do. pip resolves the clients with no pins of ours; the test
checks that the gateway held none of them back (the same versions as pip picks for them
alone), that the environment is consistent, and that the gateway serves, its CLI runs and the
clients talk to it there, on whatever protobuf pip chose for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers import MODELS, ROOT, GatewayProcess

HERE = Path(__file__).resolve().parent
CLIENTS = ("tritonclient[grpc]", "kserve", "mlserver")


def _pip(python: Path, *args: str, timeout: float = 900) -> str:
    completed = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, f"pip {' '.join(args)}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


def _resolve(python: Path, report: Path, *requirements: str) -> dict[str, str]:
    """What pip would install for `requirements` into an empty environment: {name: version}."""
    _pip(python, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *requirements)
    picked = json.loads(report.read_text())["install"]
    return {p["metadata"]["name"].lower(): p["metadata"]["version"] for p in picked}


def _run(python: Path, *args: str, timeout: float = 120) -> str:
    completed = subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert completed.returncode == 0, f"{args}:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the gateway, then the three clients installed after it."""
    base = tmp_path_factory.mktemp("beside-clients")
    source = base / "src"  # a copy, so building the wheel leaves nothing in the work tree
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    venv.create(base / "venv", with_pip=True)
    python = base / "venv" / "bin" / "python"
    _pip(python, "install", "--quiet", str(source))
    _pip(python, "install", "--quiet", *CLIENTS)
    return python


def _versions(python: Path) -> dict[str, str]:
    listed = json.loads(_pip(python, "list", "--format", "json"))
    return {p["name"].lower(): p["version"] for p in listed}


@pytest.mark.slow
def test_the_gateway_holds_no_client_back_and_the_environment_is_consistent(env: Path, tmp_path: Path) -> None:
    alone = _resolve(Path(sys.executable), tmp_path / "alone.json", *CLIENTS)
    installed = _versions(env)
    for name in ("tritonclient", "kserve", "mlserver"):
        assert installed[name] == alone[name], (name, installed[name], alone[name])
    assert installed["protobuf"] == alone["protobuf"]  # whatever the clients need, the gateway runs on it
    _pip(env, "check")
    # MLServer's newest release cannot live beside kserve's (fastapi), so pip picks an old one above;
    # beside the gateway alone it gets the newest, with nothing held back either.
    with_gateway = _resolve(env, tmp_path / "mlserver.json", "mlserver", str(env.parents[2] / "src"))
    assert with_gateway["mlserver"] == _resolve(env, tmp_path / "mlserver-alone.json", "mlserver")["mlserver"]


def _direct(version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS / "ctr-ranker" / version / "model.onnx"))
    result: np.ndarray = session.run(None, {"features": x})[0]
    return result


@pytest.mark.slow
def test_the_gateway_serves_and_the_clients_work_there(env: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gateway.db", launcher=(str(env.parent / "gateway"),))
    try:
        cli = _run(env.parent / "gateway", "predict", "ctr-ranker@1.14", "--features", json.dumps([0.1] * 32),
                   "--target", gateway.target, "--json")  # fmt: skip
        assert json.loads(cli)["version"] == "1.14"
        triton = json.loads(_run(env, str(HERE / "tritonclient_probe.py"), gateway.target))
        assert triton["live"] and triton["model_ready"]
        for version, scores in triton["results"].items():
            x = np.asarray(triton["features"], dtype=np.float32)
            np.testing.assert_allclose(np.asarray(scores, dtype=np.float32), _direct(version, x), rtol=1e-6)
        kserve = json.loads(_run(env, str(HERE / "kserve_probe.py"), gateway.target))
        assert kserve["live"] and kserve["version"] == "1.13"
        x = np.asarray(kserve["features"], dtype=np.float32)
        np.testing.assert_allclose(np.asarray(kserve["score"], dtype=np.float32), _direct("1.13", x), rtol=1e-6)
    finally:
        assert gateway.stop() == 0
