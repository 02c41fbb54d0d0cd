"""The `gateway` command as users run it: real processes, real ports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import build_parser
from testkit.gateways import ROOT, GatewayProcess, config_text

pytestmark = pytest.mark.slow  # `gateway` as users run it: one or more processes per test

GATEWAY = [sys.executable, "-m", "gateway.cli"]
ROW = json.dumps([0.1] * 32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("store") / "gateway.db")
    assert gateway.ready_line.startswith(f"gateway ready: inference on {gateway.target}")
    yield gateway.target
    assert gateway.stop() == 0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def test_serve_prints_ready_line_and_predict_shows_version_and_arm(served: str) -> None:
    result = run("predict", "ctr-ranker", "--features", ROW, "--routing-key", "user-1", "--target", served)
    assert result.returncode == 0, result.stderr
    assert re.match(
        r"ctr-ranker 1\.1[23] \(arm: (stable|canary), request id: [0-9a-f]{32}\)\n  score: \[\[0\.\d+\]\]",
        result.stdout,
    )


def test_predict_json_pin_and_batch(served: str) -> None:
    result = run("predict", "ctr-ranker@1.14", "--features", json.dumps([[0.1] * 32] * 2), "--target", served, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["version"], body["arm"], body["route_revision"]) == ("1.14", "pinned", 1)
    assert len(body["outputs"]["score"]) == 2


def test_predict_features_from_file(served: str, tmp_path: Path) -> None:
    path = tmp_path / "row.json"
    path.write_text(json.dumps({"features": [0.2] * 32}))
    result = run("predict", "ctr-ranker:canary", "--features", f"@{path}", "--target", served)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ctr-ranker 1.13 (arm: pinned")


def test_predict_error_is_one_line_and_nonzero(served: str) -> None:
    result = run("predict", "ctr-ranker@7", "--features", ROW, "--target", served)
    assert result.returncode != 0
    assert result.stderr.strip() == "error: NOT_FOUND: ctr-ranker has no version '7'; versions: 1.12, 1.13, 1.14"


def test_invalid_route_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(config_text(traffic='{"1.12": 90, "1.13": 20}'))
    result = run(
        "serve",
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--store",
        f"sqlite:///{tmp_path}/s.db",
    )
    assert result.returncode != 0
    assert "endpoints.ctr-ranker.traffic: weights sum to 110; they must sum to 100" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_artifact_stops_the_start(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ROOT / "models" / "ctr-ranker", tmp_path / "ctr-ranker")
    model = tmp_path / "ctr-ranker" / "1.13" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x01")
    path = tmp_path / "routes.yaml"
    path.write_text(config_text().replace(f"model_root: {ROOT / 'models'}", f"model_root: {tmp_path}"))
    result = run(
        "serve",
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--store",
        f"sqlite:///{tmp_path}/s.db",
    )
    assert result.returncode != 0
    assert "the file changed after it was published" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_window_history_stops_the_start(tmp_path: Path) -> None:
    result = run("serve", "--window-history", "forever", "--store", f"sqlite:///{tmp_path}/s.db")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: setting window_history (--window-history, $GATEWAY_WINDOW_HISTORY, server.window_history in the "
        "route file): 'forever' is not a duration; write 30s, 5m, 2h or 1d"
    )


def test_help_lists_every_command_with_a_summary_and_the_readme_shows_each(capsys: pytest.CaptureFixture[str]) -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^    ([a-z]+) +(\S.*)$", result.stdout, re.MULTILINE))
    expected = {"serve", "predict", "admin", "report", "rollout", "incidents", "runbook", "gameday", "batch"}
    assert set(listed) == expected, result.stdout
    readme = (ROOT / "README.md").read_text()
    undocumented = sorted(name for name in listed if f"gateway {name} " not in readme)
    assert not undocumented, f"commands the README never shows: {undocumented}"
    capsys.readouterr()
    for name in sorted(expected):  # each command's own help (in process: one interpreter start is enough)
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([name, "--help"])
        assert exited.value.code == 0 and capsys.readouterr().out.startswith(f"usage: gateway {name}"), name


def test_ci_entry_point_is_executable() -> None:
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
