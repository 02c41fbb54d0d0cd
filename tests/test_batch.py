"""Batch predictions with real Parquet and CSV files, the real runtime and a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.batch import read_current
from gateway.batch.gates import GateSettings, Run, ks_statistic
from gateway.batch.pointer import BatchPointers
from gateway.batch.score import ScoreRequest, score
from gateway.errors import AlreadyExists, ArtifactError, FailedPrecondition, InvalidInput, NotFound
from gateway.repository import ModelRepository
from gateway.state.sqlite import SqliteStore
from tests.helpers import MODELS, ROOT

FEATURES = [f"f{i}" for i in range(32)]


def table(rows: int, seed: int = 0, one_hot_bug: bool = False) -> pa.Table:
    x = np.random.default_rng(seed).normal(size=(rows, 32)).astype(np.float32)
    if one_hot_bug:  # the credit-risk example: an encoding change scales a block of features
        x[:, :8] = x[:, :8] * 3 + 1
    return pa.table({"customer_id": np.arange(rows), **{name: x[:, i] for i, name in enumerate(FEATURES)}})


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = SqliteStore(tmp_path / "state.db")
    repository = ModelRepository(MODELS)
    yield tmp_path, store, repository, BatchPointers(store)
    store.close()


def run_score(tmp_path: Path, repository: ModelRepository, data: Path, run_id: str, version: str = "1.12", **kw):  # type: ignore[no-untyped-def]
    request = ScoreRequest(
        "ctr-ranker", version, repository.from_manifest("ctr-ranker", version), data, tmp_path / "out",
        run_id=run_id, columns=FEATURES, keep_columns=("customer_id",), chunk_rows=kw.pop("chunk_rows", 4096),
    )  # fmt: skip
    return score(request, repository, **kw)


def test_score_writes_an_immutable_run_matching_onnxruntime(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, _ = env
    data = tmp_path / "day1.parquet"
    pq.write_table(table(10_000), data)
    result = run_score(tmp_path, repository, data, "day-1")
    assert result.path == tmp_path / "out" / "ctr-ranker" / "day-1" and result.rows == 10_000
    out = pq.read_table(result.path / "predictions.parquet")
    assert out.column_names == ["customer_id", "score"] and out.num_rows == 10_000
    x = np.column_stack([table(10_000).column(n).to_numpy() for n in FEATURES])
    expected = ort.InferenceSession(str(MODELS / "ctr-ranker/1.12/model.onnx")).run(None, {"features": x})[0][:, 0]
    np.testing.assert_array_equal(out.column("score").to_numpy(), expected)
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["model"]["version"] == "1.12" and len(manifest["model"]["sha256"]) == 64
    assert manifest["input"]["rows"] == 10_000 and len(manifest["input"]["sha256"]) == 64
    assert manifest["output"]["schema"] == [
        {"name": "customer_id", "type": "int64"},
        {"name": "score", "type": "float"},
    ]
    assert abs(manifest["score_summary"]["mean"] - float(expected.mean())) < 1e-6
    assert manifest["finished_at"] >= manifest["started_at"]
    with pytest.raises(AlreadyExists, match="runs are immutable"):
        run_score(tmp_path, repository, data, "day-1")


def test_csv_and_list_column_inputs(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, _ = env
    csv = tmp_path / "rows.csv"
    rows = table(500)
    import pyarrow.csv as pcsv

    pcsv.write_csv(rows, csv)
    assert run_score(tmp_path, repository, csv, "from-csv").rows == 500
    x = np.random.default_rng(1).normal(size=(300, 32)).astype(np.float32)
    listed = tmp_path / "listed.parquet"
    pq.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 32)}), listed)
    request = ScoreRequest(
        "ctr-ranker", "1.13", repository.from_manifest("ctr-ranker", "1.13"), listed, tmp_path / "out", run_id="listed"
    )
    assert score(request, repository).rows == 300
    bad = tmp_path / "narrow.parquet"
    pq.write_table(pa.table({"a": [1.0], "b": [2.0]}), bad)
    with pytest.raises(InvalidInput, match="takes 32 features per row, but 2 numeric columns"):
        score(
            ScoreRequest(
                "ctr-ranker", "1.13", repository.from_manifest("ctr-ranker", "1.13"), bad, tmp_path / "out", run_id="x"
            ),
            repository,
        )


def test_gates_catch_the_one_hot_encoding_shift(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, pointers = env
    good, shifted, again = tmp_path / "good.parquet", tmp_path / "bad.parquet", tmp_path / "again.parquet"
    pq.write_table(table(20_000, seed=1), good)
    pq.write_table(table(20_000, seed=2, one_hot_bug=True), shifted)
    pq.write_table(table(20_000, seed=3), again)
    settings = GateSettings()
    first = Run.load(run_score(tmp_path, repository, good, "n1").path)
    pointers.publish("nightly", "ctr-ranker", first, settings)
    bad = Run.load(run_score(tmp_path, repository, shifted, "n2").path)
    gates = {g.name: g for g in pointers.validate("ctr-ranker", bad, settings)}
    assert not gates["ks_statistic"].passed and gates["ks_statistic"].value > 0.1
    with pytest.raises(FailedPrecondition, match="n2 failed its gates: ks_statistic"):
        pointers.publish("nightly", "ctr-ranker", bad, settings)
    assert pointers.current("ctr-ranker").run_id == "n1"
    fine = Run.load(run_score(tmp_path, repository, again, "n3").path)
    assert all(g.passed for g in pointers.validate("ctr-ranker", fine, settings))
    assert ks_statistic(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 0.0
    assert ks_statistic(np.array([0.0, 0.0]), np.array([1.0, 1.0])) == 1.0


def test_publish_force_freeze_rollback_round_trips(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, store, repository, pointers = env
    settings = GateSettings()
    paths = {}
    for i, bug in ((1, False), (2, False), (3, True)):
        data = tmp_path / f"d{i}.parquet"
        pq.write_table(table(5_000, seed=i, one_hot_bug=bug), data)
        paths[i] = Run.load(run_score(tmp_path, repository, data, f"d{i}").path)
    pointers.publish("nightly", "ctr-ranker", paths[1], settings)
    pointers.publish("nightly", "ctr-ranker", paths[2], settings)
    with pytest.raises(InvalidInput, match="--force needs --reason"):
        pointers.publish("oncall", "ctr-ranker", paths[3], settings, force=True)
    pointers.publish("oncall", "ctr-ranker", paths[3], settings, force=True, reason="new encoder, reviewed")
    assert pointers.current("ctr-ranker").run_id == "d3"
    assert read_current("ctr-ranker", f"sqlite:///{tmp_path / 'state.db'}") == paths[3].path.resolve()
    # Detect: consumers report shifted scores. Freeze on the last known good (d2, not the forced d3).
    frozen = pointers.rollback("oncall", "ctr-ranker", reason="credit scores shifted", freeze=True)
    assert (frozen.run_id, frozen.frozen) == ("d2", True)
    with pytest.raises(FailedPrecondition, match="is frozen"):
        pointers.publish("nightly", "ctr-ranker", paths[1], settings)
    pointers.unfreeze("oncall", "ctr-ranker", reason="fixed transformer ready")
    back = pointers.rollback("oncall", "ctr-ranker", to="d1", reason="compare with d1")
    assert back.run_id == "d1" and not back.frozen
    statuses = {r.run_id: r.status for r in pointers.runs("ctr-ranker")}
    assert statuses == {"d1": "published", "d2": "rolled-back", "d3": "rolled-back"}
    history = [(e.action, e.actor, e.changes[0]["after"]) for e in pointers.history("ctr-ranker")]
    assert history[:4] == [
        ("batch-rollback", "oncall", "d1"), ("batch-unfreeze", "oncall", "d2"),
        ("batch-freeze", "oncall", "d2"), ("batch-publish-forced", "oncall", "d3"),
    ]  # fmt: skip
    assert store.audit("ctr-ranker")[0].reason == "compare with d1"


def test_a_corrupted_run_cannot_be_published_or_pointed_to(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, pointers = env
    data = tmp_path / "d.parquet"
    pq.write_table(table(2_000), data)
    first = Run.load(run_score(tmp_path, repository, data, "ok").path)
    pointers.publish("nightly", "ctr-ranker", first, GateSettings())
    second = Run.load(run_score(tmp_path, repository, data, "tampered").path)
    with second.predictions.open("ab") as handle:
        handle.write(b"garbage")
    with pytest.raises(FailedPrecondition, match="changed or corrupted after scoring"):
        pointers.publish("oncall", "ctr-ranker", second, GateSettings(), force=True, reason="try anyway")
    with first.predictions.open("ab") as handle:
        handle.write(b"x")
    pointers.publish(
        "nightly", "ctr-ranker", Run.load(run_score(tmp_path, repository, data, "third").path), GateSettings()
    )
    with pytest.raises(ArtifactError, match="corrupted"):
        pointers.rollback("oncall", "ctr-ranker", to="ok", reason="go back")
    assert pointers.current("ctr-ranker").run_id == "third"
    with pytest.raises(NotFound, match="not a finished batch run"):
        Run.load(tmp_path / "out" / "ctr-ranker" / "missing")


@pytest.mark.slow
def test_a_crash_mid_score_leaves_no_run_and_the_pointer_where_it_was(tmp_path: Path) -> None:
    data = tmp_path / "big.parquet"
    pq.write_table(table(1_000_000, seed=4), data)
    store = f"sqlite:///{tmp_path / 'state.db'}"
    base = [sys.executable, "-m", "gateway.cli", "batch"]
    common = ["--store", store, "--output-root", str(tmp_path / "out"), "--config", str(MODELS / "gateway.yaml"),
              "--columns", ",".join(FEATURES)]  # fmt: skip
    first = subprocess.run(
        [*base, "score", "ctr-ranker", "--version", "1.12", "--input", str(data), "--run-id", "before", "--chunk-rows", "50000", *common],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    published = subprocess.run(
        [*base, "publish", "ctr-ranker", "before", *common[:-2]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    process = subprocess.Popen(
        [*base, "score", "ctr-ranker", "--version", "1.13", "--input", str(data), "--run-id", "crashed", "--chunk-rows", "500", *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    partial = tmp_path / "out" / "ctr-ranker" / ".crashed.partial" / "predictions.parquet"
    deadline = time.time() + 60
    while not partial.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert not (tmp_path / "out" / "ctr-ranker" / "crashed").exists()
    current = subprocess.run(
        [*base, "current", "ctr-ranker", "--json", *common[:-2]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert json.loads(current.stdout)["run_id"] == "before"
    refused = subprocess.run(
        [*base, "publish", "ctr-ranker", "crashed", *common[:-2]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0 and "NOT_FOUND" in refused.stderr
    retry = subprocess.run(
        [*base, "score", "ctr-ranker", "--version", "1.13", "--input", str(data), "--run-id", "crashed", "--chunk-rows", "50000", *common],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert retry.returncode == 0, retry.stderr  # a crashed attempt's leftovers do not block the re-run


def test_cli_validate_exit_codes_and_history(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(table(3_000, seed=5), good)
    pq.write_table(table(3_000, seed=6, one_hot_bug=True), bad)
    common = [
        "--store",
        f"sqlite:///{tmp_path / 'state.db'}",
        "--output-root",
        str(tmp_path / "out"),
        "--config",
        str(MODELS / "gateway.yaml"),
    ]

    def batch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "batch", *args, *common],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    columns = ",".join(FEATURES)
    assert (
        batch(
            "score", "ctr-ranker", "--version", "1.12", "--input", str(good), "--run-id", "g", "--columns", columns
        ).returncode
        == 0
    )
    assert batch("publish", "ctr-ranker", "g").returncode == 0
    assert (
        batch(
            "score", "ctr-ranker", "--version", "1.12", "--input", str(bad), "--run-id", "b", "--columns", columns
        ).returncode
        == 0
    )
    validate = batch("validate", "ctr-ranker", "b")
    assert validate.returncode == 1
    assert "ks_statistic" in validate.stdout and "FAIL" in validate.stdout
    refused = batch("publish", "ctr-ranker", "b")
    assert refused.returncode == 1 and "failed its gates" in refused.stderr
    history = batch("history", "ctr-ranker")
    assert "failed-gates" in history.stdout and "batch-publish" in history.stdout
