"""Batch predictions with real Parquet and CSV files, the real runtime and a real SQLite store."""

from __future__ import annotations

import hashlib
import json
import re
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
from gateway.batch.gates import Run, ks_statistic
from gateway.batch.pointer import BatchPointers
from gateway.batch.score import ScoreRequest, score
from gateway.config import BatchGatesConfig
from gateway.errors import AlreadyExists, ArtifactError, FailedPrecondition, InvalidInput, NotFound
from gateway.repository import ModelRepository
from gateway.state.sqlite import SqliteStore
from testkit.gateways import MODELS, ROOT

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


def run_score(tmp_path: Path, repository: ModelRepository, data: Path, run_id: str, version: str = "1.12"):  # type: ignore[no-untyped-def]
    request = ScoreRequest(
        "ctr-ranker", version, repository.from_manifest("ctr-ranker", version), data, tmp_path / "out",
        run_id=run_id, columns=FEATURES, keep_columns=("customer_id",), chunk_rows=4096,
    )  # fmt: skip
    return score(request, repository)


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
    model_bytes = (MODELS / "ctr-ranker/1.12/model.onnx").read_bytes()
    assert manifest["model"]["sha256"] == repository.from_manifest("ctr-ranker", "1.12").sha256
    assert manifest["model"]["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert manifest["input"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    predictions = (result.path / "predictions.parquet").read_bytes()
    assert manifest["output"]["sha256"] == hashlib.sha256(predictions).hexdigest()
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
    settings = BatchGatesConfig()
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
    settings = BatchGatesConfig()
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
    frozen = pointers.freeze("oncall", "ctr-ranker", reason="credit scores shifted")
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
    pointers.publish("nightly", "ctr-ranker", first, BatchGatesConfig())
    second = Run.load(run_score(tmp_path, repository, data, "tampered").path)
    with second.predictions.open("ab") as handle:
        handle.write(b"garbage")
    with pytest.raises(FailedPrecondition, match="changed or corrupted after scoring"):
        pointers.publish("oncall", "ctr-ranker", second, BatchGatesConfig(), force=True, reason="try anyway")
    with first.predictions.open("ab") as handle:
        handle.write(b"x")
    pointers.publish(
        "nightly", "ctr-ranker", Run.load(run_score(tmp_path, repository, data, "third").path), BatchGatesConfig()
    )
    with pytest.raises(ArtifactError, match="corrupted"):
        pointers.rollback("oncall", "ctr-ranker", to="ok", reason="go back")
    assert pointers.current("ctr-ranker").run_id == "third"
    with pytest.raises(NotFound, match="not a finished batch run"):
        Run.load(tmp_path / "out" / "ctr-ranker" / "missing")


#: `gateway batch ...` in a process that kills itself (SIGKILL) right after writing its third chunk.
CRASH_AFTER_THIRD_CHUNK = """
import os, signal, sys
import pyarrow.parquet as pq
from gateway.cli import main

class Crashing(pq.ParquetWriter):
    chunks = 0

    def write_table(self, *args, **kwargs):
        super().write_table(*args, **kwargs)
        Crashing.chunks += 1
        if Crashing.chunks == 3:
            os.kill(os.getpid(), signal.SIGKILL)

pq.ParquetWriter = Crashing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_crash_mid_score_leaves_no_run_and_the_pointer_where_it_was(tmp_path: Path) -> None:
    data = tmp_path / "data.parquet"
    pq.write_table(table(5_000, seed=4), data)
    store = f"sqlite:///{tmp_path / 'state.db'}"
    base = [sys.executable, "-m", "gateway.cli", "batch"]
    common = ["--store", store, "--output-root", str(tmp_path / "out"), "--config", str(MODELS / "gateway.yaml"),
              "--columns", ",".join(FEATURES)]  # fmt: skip
    first = subprocess.run(
        [*base, "score", "ctr-ranker", "--version", "1.12", "--input", str(data), "--run-id", "before", "--chunk-rows", "500", *common],
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
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_THIRD_CHUNK, "batch", "score", "ctr-ranker", "--version", "1.13",
         "--input", str(data), "--run-id", "crashed", "--chunk-rows", "500", *common],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr  # killed mid-score, 3 of 10 chunks written
    assert (tmp_path / "out" / "ctr-ranker" / ".crashed.partial" / "predictions.parquet").exists()
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


@pytest.mark.slow
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
    scored = batch(
        "score", "ctr-ranker", "--version", "1.12", "--input", str(good), "--run-id", "g", "--columns", columns
    )
    assert scored.returncode == 0
    assert "rows/s" not in scored.stderr  # no progress bar when stderr is not a terminal
    assert batch("publish", "ctr-ranker", "g").returncode == 0
    assert (
        batch(
            "score", "ctr-ranker", "--version", "1.12", "--input", str(bad), "--run-id", "b", "--columns", columns
        ).returncode
        == 0
    )
    zero = batch("validate", "ctr-ranker", "b", "--ks-max", "0")
    assert zero.returncode == 1 and "Traceback" not in zero.stderr
    assert zero.stderr.startswith("error: INVALID_ARGUMENT: command line: ks_max: Input should be greater than 0")
    validate = batch("validate", "ctr-ranker", "b")
    assert validate.returncode == 1
    verdicts = {line.split()[0]: "FAIL" in line.split() for line in validate.stdout.splitlines()[1:] if line.strip()}
    assert verdicts["ks_statistic"] and not verdicts["row_count"] and not verdicts["files_intact"], validate.stdout
    refused = batch("publish", "ctr-ranker", "b")
    assert refused.returncode == 1 and "failed its gates" in refused.stderr
    history = batch("history", "ctr-ranker")
    runs = {line.split()[0]: line.split() for line in history.stdout.splitlines() if line.startswith(("b ", "g "))}
    assert (runs["b"][5], runs["g"][5]) == ("failed-gates", "published"), history.stdout
    assert "ks_statistic:FAIL," in runs["b"] and "ks_statistic:FAIL," not in runs["g"]
    assert re.search(r"batch +batch-publish +- -> g +gates passed", history.stdout), history.stdout


def cli_batch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--store", f"sqlite:///{tmp_path / 'state.db'}", "--output-root", str(tmp_path / "out"),
              "--config", str(MODELS / "gateway.yaml")]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "batch", *args, *common],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_refuses_a_list_column_of_the_wrong_width_and_a_string_column(tmp_path: Path) -> None:
    narrow = tmp_path / "narrow.parquet"
    x = np.zeros((10, 16), np.float32)
    pq.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}), narrow)
    named = tmp_path / "named.parquet"
    pq.write_table(pa.table({"name": ["a", "b"], "f0": [1.0, 2.0]}), named)
    wrong_width = cli_batch(tmp_path, "score", "ctr-ranker", "--version", "1.12", "--input", str(narrow))
    assert wrong_width.returncode == 1 and "Traceback" not in wrong_width.stderr
    assert wrong_width.stderr.startswith("error: INVALID_ARGUMENT: column 'features' is fixed_size_list<")
    assert "[16], but the model input 'features' takes 32 numbers per row" in wrong_width.stderr
    text = cli_batch(tmp_path, "score", "ctr-ranker", "--version", "1.12", "--input", str(named), "--columns", "name")
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert text.stderr.startswith("error: INVALID_ARGUMENT: column 'name' is string, but the model input 'features'")
    assert not (tmp_path / "out").exists()  # refused before any directory was made


def test_column_checks_of_the_api(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, _ = env
    artifact = repository.from_manifest("ctr-ranker", "1.12")
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"features": pa.array([[0.0] * 32, [0.0] * 31], type=pa.list_(pa.float32()))}), ragged)
    with pytest.raises(InvalidInput, match="column 'features' has a null or a list that is not 32 values long"):
        score(ScoreRequest("ctr-ranker", "1.12", artifact, ragged, tmp_path / "out", run_id="ragged"), repository)
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"a": [1.0], "b": ["x"]}), mixed)
    with pytest.raises(InvalidInput, match="column 'b' is string, but the model input 'features' takes 32 numbers"):
        score(
            ScoreRequest("ctr-ranker", "1.12", artifact, mixed, tmp_path / "out", run_id="m", columns=("a", "b")),
            repository,
        )
    listed = tmp_path / "listed.parquet"
    x = np.random.default_rng(2).normal(size=(50, 32)).astype(np.float32)
    pq.write_table(pa.table({"features": pa.array(list(x), type=pa.list_(pa.float32()))}), listed)
    result = score(ScoreRequest("ctr-ranker", "1.12", artifact, listed, tmp_path / "out", run_id="var"), repository)
    assert result.rows == 50 and list(result.manifest["input_null_counts"])[:2] == ["features[0]", "features[1]"]


def test_a_failed_score_leaves_no_partial_directory(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, _ = env
    artifact = repository.from_manifest("ctr-ranker", "1.12")
    base = tmp_path / "out" / "ctr-ranker"
    data = tmp_path / "d.parquet"
    pq.write_table(table(100), data)
    with pytest.raises(InvalidInput, match="takes 32 features per row, but 1 numeric columns"):
        score(
            ScoreRequest("ctr-ranker", "1.12", artifact, data, tmp_path / "out", run_id="c", columns=["f0"]), repository
        )
    assert not (base / ".c.partial").exists()
    # A failure after the directory exists: a value that is no number, far into a CSV (a later block).
    import pyarrow.csv as pcsv

    csv = tmp_path / "late.csv"
    pcsv.write_csv(table(8_000), csv)
    lines = csv.read_text().splitlines()
    lines[-1] = lines[-1].rsplit(",", 1)[0] + ",oops"
    csv.write_text("\n".join(lines) + "\n")
    request = ScoreRequest("ctr-ranker", "1.12", artifact, csv, tmp_path / "out", run_id="late", columns=FEATURES,
                           chunk_rows=1_000)  # fmt: skip
    with pytest.raises(InvalidInput, match="the input cannot be read as the model's features"):
        score(request, repository)
    assert not (base / ".late.partial").exists() and not (base / "late").exists()
    assert sorted(p.name for p in base.iterdir()) == []


def test_publish_after_the_published_run_directory_was_removed(env) -> None:  # type: ignore[no-untyped-def]
    import shutil

    tmp_path, _, repository, pointers = env
    data = tmp_path / "d.parquet"
    pq.write_table(table(2_000), data)
    first = Run.load(run_score(tmp_path, repository, data, "a").path)
    pointers.publish("nightly", "ctr-ranker", first, BatchGatesConfig())
    second = Run.load(run_score(tmp_path, repository, data, "b").path)
    shutil.rmtree(first.path)
    gates = {g.name: g for g in pointers.publish("nightly", "ctr-ranker", second, BatchGatesConfig())}
    assert pointers.current("ctr-ranker").run_id == "b"
    assert gates["schema"].passed and gates["schema"].detail == "no comparison: published a is damaged"
    assert gates["published_intact"].detail.endswith(
        "is missing (no manifest.json): the run's directory was moved or deleted"
    )
    assert "ks_statistic" not in gates


def test_row_count_gate_catches_rows_the_scorer_lost(env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import gateway.batch.score as scoring

    tmp_path, _, repository, pointers = env
    data = tmp_path / "d.parquet"
    pq.write_table(table(10_000), data)
    read = scoring._batches

    def losing(path: Path, chunk_rows: int):  # type: ignore[no-untyped-def]
        schema, batches = read(path, chunk_rows)
        return schema, (b for i, b in enumerate(batches) if i != 1)  # the second chunk never arrives

    monkeypatch.setattr(scoring, "_batches", losing)
    run = Run.load(run_score(tmp_path, repository, data, "lossy").path)
    assert run.manifest["input"]["rows"] == 10_000 and run.manifest["output"]["rows"] == 10_000 - 4096
    gates = {g.name: g for g in pointers.validate("ctr-ranker", run, BatchGatesConfig())}
    assert not gates["row_count"].passed and (gates["row_count"].value, gates["row_count"].threshold) == (5904, 10_000)
    with pytest.raises(FailedPrecondition, match="lossy failed its gates: row_count 5904 \\(limit 10000\\)"):
        pointers.publish("nightly", "ctr-ranker", run, BatchGatesConfig())
    csv = tmp_path / "d.csv"
    import pyarrow.csv as pcsv

    pcsv.write_csv(table(10_000), csv)
    from_csv = Run.load(run_score(tmp_path, repository, csv, "lossy-csv").path)
    assert from_csv.manifest["input"]["rows"] == 10_000 and from_csv.manifest["output"]["rows"] < 10_000


def test_history_and_runs_find_batch_entries_behind_many_others(env) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    from gateway.state import AuditDraft

    tmp_path, store, repository, pointers = env
    data = tmp_path / "d.parquet"
    pq.write_table(table(500), data)
    pointers.publish(
        "nightly", "ctr-ranker", Run.load(run_score(tmp_path, repository, data, "r1").path), BatchGatesConfig()
    )
    for i in range(5):  # newer, non-batch entries of the same endpoint
        store.append_audit(AuditDraft(at=time.time(), actor="oncall", action="set-traffic", endpoint="ctr-ranker",
                                      reason=f"step {i}", dry_run=False, revision_before=0))  # fmt: skip
    assert [e.action for e in pointers.history("ctr-ranker", limit=1)] == ["batch-publish"]
    later = time.time() + 10
    with sqlite3.connect(tmp_path / "state.db") as db:  # one transaction: 10,001 put_record calls would take long
        db.executemany(
            "INSERT INTO records (kind, key, at, body) VALUES (?, ?, ?, ?)",
            [("batch-run", f"other/{i}", later, "{}") for i in range(10_001)],  # another endpoint's, all newer
        )
    assert len(store.list_records("batch-run", 20_000)) == 10_002
    assert [r.run_id for r in pointers.runs("ctr-ranker")] == ["r1"]


def test_the_playbook_order_freeze_rollback_rerun_unfreeze_publish(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, pointers = env
    settings = BatchGatesConfig()
    runs = {}
    for run_id, seed, bug in (("n1", 11, False), ("n2", 12, False), ("n3", 13, True), ("n3-fixed", 13, False)):
        data = tmp_path / f"{run_id}.parquet"
        pq.write_table(table(5_000, seed=seed, one_hot_bug=bug), data)
        runs[run_id] = Run.load(run_score(tmp_path, repository, data, run_id).path)
    pointers.publish("nightly", "ctr-ranker", runs["n1"], settings)
    pointers.publish("nightly", "ctr-ranker", runs["n2"], settings)
    # Detect: the gates refuse n3; consumers keep reading n2.
    with pytest.raises(FailedPrecondition, match="n3 failed its gates: ks_statistic"):
        pointers.publish("nightly", "ctr-ranker", runs["n3"], settings)
    # Freeze: n2 is known-good, so consumers stay on it; nothing publishes until unfreeze.
    frozen = pointers.freeze("oncall", "ctr-ranker", reason="one-hot encoding change")
    assert (frozen.run_id, frozen.frozen) == ("n2", True)
    # Rollback to an earlier run keeps the freeze (it used to lift it silently).
    back = pointers.rollback("oncall", "ctr-ranker", to="n1", reason="n2 saw part of the change")
    assert (back.run_id, back.frozen) == ("n1", True)
    with pytest.raises(FailedPrecondition, match="is frozen"):
        pointers.publish("nightly", "ctr-ranker", runs["n3-fixed"], settings)
    # Remediate and re-run under a new id; verify; unfreeze; publish.
    assert all(g.passed for g in pointers.validate("ctr-ranker", runs["n3-fixed"], settings))
    assert not pointers.unfreeze("oncall", "ctr-ranker", reason="fixed run validated").frozen
    pointers.publish("oncall", "ctr-ranker", runs["n3-fixed"], settings)
    assert pointers.current("ctr-ranker").run_id == "n3-fixed"
    actions = [e.action for e in pointers.history("ctr-ranker")][:4]
    assert actions == ["batch-publish", "batch-unfreeze", "batch-rollback", "batch-freeze"]
    with pytest.raises(FailedPrecondition, match="is not frozen"):
        pointers.unfreeze("oncall", "ctr-ranker", reason="again")


def test_freeze_without_a_known_good_run_names_one_and_freeze_to_does(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, pointers = env
    settings = BatchGatesConfig()
    for run_id, seed, bug in (("a", 21, False), ("b", 22, True)):
        data = tmp_path / f"{run_id}.parquet"
        pq.write_table(table(3_000, seed=seed, one_hot_bug=bug), data)
        run = Run.load(run_score(tmp_path, repository, data, run_id).path)
        pointers.publish("nightly", "ctr-ranker", run, settings, force=True, reason="reviewed by hand")
    pointers.rollback("oncall", "ctr-ranker", to="a", reason="b is shifted")
    pointers.rollback("oncall", "ctr-ranker", to="b", reason="a is wrong too")
    # b was forced past its gates and a was rolled back: neither is known-good, so freeze cannot
    # guess where consumers should go, and says how to name a run.
    with pytest.raises(FailedPrecondition, match=r"name one: `gateway batch freeze ctr-ranker --to RUN`"):
        pointers.freeze("oncall", "ctr-ranker", reason="scores shifted")
    frozen = pointers.freeze("oncall", "ctr-ranker", to="a", reason="scores shifted")
    assert (frozen.run_id, frozen.frozen) == ("a", True)
    # Rolling back to the run consumers already read changes nothing and writes no audit entry.
    entries = len(pointers.history("ctr-ranker"))
    assert pointers.rollback("oncall", "ctr-ranker", to="a", reason="again").frozen
    assert len(pointers.history("ctr-ranker")) == entries


def test_a_schema_refusal_names_the_columns_that_differ(env) -> None:  # type: ignore[no-untyped-def]
    tmp_path, _, repository, pointers = env
    data = tmp_path / "d.parquet"
    pq.write_table(table(2_000, seed=31), data)
    pointers.publish("nightly", "ctr-ranker", Run.load(run_score(tmp_path, repository, data, "with-ids").path),
                     BatchGatesConfig())  # fmt: skip
    request = ScoreRequest(
        "ctr-ranker", "1.12", repository.from_manifest("ctr-ranker", "1.12"), data, tmp_path / "out",
        run_id="without-ids", columns=FEATURES,
    )  # fmt: skip
    rerun = Run.load(score(request, repository).path)
    gates = {g.name: g for g in pointers.validate("ctr-ranker", rerun, BatchGatesConfig())}
    assert not gates["schema"].passed
    assert gates["schema"].detail == "vs with-ids: missing column customer_id (int64)"
    with pytest.raises(FailedPrecondition) as refused:
        pointers.publish("nightly", "ctr-ranker", rerun, BatchGatesConfig())
    assert "schema: vs with-ids: missing column customer_id (int64)" in refused.value.message
    assert "(limit -)" not in refused.value.message


def test_the_mean_gate_is_relative_to_the_published_mean(tmp_path: Path) -> None:
    from gateway.batch.gates import evaluate_gates

    def fake_run(name: str, scores: np.ndarray) -> Run:
        directory = tmp_path / name
        directory.mkdir()
        pq.write_table(pa.table({"score": scores.astype(np.float32)}), directory / "predictions.parquet")
        digest = hashlib.sha256((directory / "predictions.parquet").read_bytes()).hexdigest()
        manifest = {"run_id": name, "input": {"rows": len(scores)},
                    "output": {"file": "predictions.parquet", "sha256": digest, "score_column": "score",
                               "schema": [{"name": "score", "type": "float"}]}}  # fmt: skip
        (directory / "manifest.json").write_text(json.dumps(manifest))
        return Run.load(directory)

    rng = np.random.default_rng(5)
    base = rng.beta(2, 100, size=20_000)  # CTR-scale scores, mean about 0.0196
    published = fake_run("published", base)
    # The case: the mean fell by 29% (0.0166 -> 0.0118), an absolute shift of only 0.0048.
    shifted = fake_run("shifted", base * 0.71)
    gates = {g.name: g for g in evaluate_gates(shifted, published, BatchGatesConfig())}
    mean = gates["mean_shift"]
    assert not mean.passed and mean.percent and mean.value is not None and abs(mean.value + 0.29) < 1e-3
    assert mean.shown() == "-29.0%" and mean.shown(threshold=True) == "±5%"
    absolute = BatchGatesConfig(mean_shift="absolute")
    assert {g.name: g for g in evaluate_gates(shifted, published, absolute)}["mean_shift"].passed
    same = fake_run("same", rng.beta(2, 100, size=20_000))
    assert all(g.passed for g in evaluate_gates(same, published, BatchGatesConfig()))
