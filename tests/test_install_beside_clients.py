"""The gateway installs beside the clients its users already have, and still works there.

- pip's answer for `tritonclient[grpc] kserve mlserver` (no pins of ours) is the same with the
  gateway in the set as without it: the gateway holds none of them back, protobuf included.
- One fresh virtual environment as the README has it: the gateway first, then
  `pip install 'tritonclient[grpc]'` (which moves protobuf to 6.x today). The environment is
  consistent, the gateway serves and its CLI runs there, and the README's client code works.
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

from testkit.gateways import MODELS, ROOT, GatewayProcess

HERE = Path(__file__).resolve().parent
CLIENTS = ("tritonclient[grpc]", "kserve", "mlserver")


def _pip(python: Path, *args: str, timeout: float = 900) -> str:
    completed = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, f"pip {' '.join(args)}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


def _resolve(report: Path, *requirements: str) -> dict[str, str]:
    """What pip would install for `requirements` into an empty environment: {name: version}."""
    _pip(Path(sys.executable), "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         *requirements)  # fmt: skip
    picked = json.loads(report.read_text())["install"]
    return {p["metadata"]["name"].lower(): p["metadata"]["version"] for p in picked}


def _run(program: Path, *args: str, timeout: float = 120) -> str:
    completed = subprocess.run([str(program), *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert completed.returncode == 0, f"{args}:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package source, so building it leaves nothing in the work tree."""
    copy = tmp_path_factory.mktemp("gateway-src")
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copy(ROOT / "README.md", copy)
    shutil.copytree(ROOT / "gateway", copy / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.slow
def test_the_gateway_holds_no_client_back(source: Path, tmp_path: Path) -> None:
    alone = _resolve(tmp_path / "alone.json", *CLIENTS)
    together = _resolve(tmp_path / "together.json", str(source), *CLIENTS)
    assert together["model-gateway"]
    for name in ("tritonclient", "kserve", "mlserver", "protobuf", "grpcio"):
        assert together[name] == alone[name], (name, together[name], alone[name])


@pytest.mark.slow
def test_readme_order_gateway_then_tritonclient_in_one_venv(source: Path, tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    python = bin_dir / "python"
    _pip(python, "install", "--quiet", str(source))
    _pip(python, "install", "--quiet", "tritonclient[grpc]")  # as the README says, after the gateway
    _pip(python, "check")
    installed = {p["name"].lower(): p["version"] for p in json.loads(_pip(python, "list", "--format", "json"))}
    assert installed["tritonclient"] == _resolve(tmp_path / "triton.json", "tritonclient[grpc]")["tritonclient"]
    gateway = GatewayProcess(tmp_path / "gateway.db", launcher=(str(bin_dir / "gateway"),))
    try:
        cli = _run(bin_dir / "gateway", "predict", "ctr-ranker@1.14", "--features", json.dumps([0.1] * 32),
                   "--target", gateway.target, "--json")  # fmt: skip
        assert json.loads(cli)["version"] == "1.14"
        readme = _run(python, str(HERE / "readme_client.py"), gateway.target)  # prints the routed version
        assert readme.split()[0] in {"1.12", "1.13"}
        triton = json.loads(_run(python, str(HERE / "tritonclient_probe.py"), gateway.target))
        assert triton["live"] and triton["model_ready"]
        x = np.asarray(triton["features"], dtype=np.float32)
        for version, scores in triton["results"].items():
            session = ort.InferenceSession(str(MODELS / "ctr-ranker" / version / "model.onnx"))
            np.testing.assert_allclose(np.asarray(scores, dtype=np.float32), session.run(None, {"features": x})[0])
    finally:
        assert gateway.stop() == 0
