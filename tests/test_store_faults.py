"""Store faults: an empty, corrupt, foreign or read-only store never starts silently, and never loses history.

`gateway serve` runs as users run it (a real process); a failing start must be one line that
names the file and the problem, with a non-zero exit code and no traceback. A store that
stops accepting writes while serving answers changes with UNAVAILABLE, not INTERNAL.
"""

from __future__ import annotations

import ctypes
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from gateway.errors import StoreUnavailable
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.state.sqlite import SqliteStore
from testkit.gateways import DEMO_CONFIG, ONCALL_TOKEN, ROOT, running_gateway


def _without_file_permission_override() -> None:
    """Run as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so file modes apply to it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def serve(store: Path) -> subprocess.CompletedProcess[str]:
    """`gateway serve` on `store`; these stores are refused, so it must exit by itself."""
    return subprocess.run(
        [
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(DEMO_CONFIG), "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0", "--store", f"sqlite:///{store}", "--shadow-log-dir", "",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env={**os.environ, "GATEWAY_ADMIN_TOKENS": f"oncall={ONCALL_TOKEN}"},
        preexec_fn=_without_file_permission_override if os.geteuid() == 0 else None,
    )  # fmt: skip


def one_line_naming(result: subprocess.CompletedProcess[str], store: Path, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "gateway ready" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(store) in errors[0], errors[0]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_an_empty_store_file_is_never_reseeded(tmp_path: Path) -> None:
    store = tmp_path / "gateway.db"
    store.write_bytes(b"")
    one_line_naming(serve(store), store, "empty")
    assert store.stat().st_size == 0  # nothing was written: the operator decides what it means


@pytest.mark.slow
def test_a_corrupt_store_names_the_file(tmp_path: Path) -> None:
    store = tmp_path / "gateway.db"
    store.write_bytes(b"this is not a database\n" * 200)
    one_line_naming(serve(store), store, "not a database")


@pytest.mark.slow
def test_a_read_only_store_refuses_to_start(tmp_path: Path) -> None:
    store = tmp_path / "gateway.db"
    SqliteStore(store).close()
    (tmp_path / "gateway.db-wal").unlink(missing_ok=True)
    (tmp_path / "gateway.db-shm").unlink(missing_ok=True)
    store.chmod(0o444)
    one_line_naming(serve(store), store, "read-only")


def test_a_foreign_database_is_not_taken_over(tmp_path: Path) -> None:
    store = tmp_path / "other.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(StoreUnavailable, match="not a gateway store") as err:
        SqliteStore(store)
    assert str(store) in err.value.message
    with sqlite3.connect(store) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"customers"}


def test_a_store_that_stops_taking_writes_answers_unavailable(tmp_path: Path) -> None:
    with running_gateway(store_path=tmp_path / "gateway.db") as gw:
        store = gw.gateway.store
        assert isinstance(store, SqliteStore)
        store._db.execute("PRAGMA query_only = ON")  # fault injection: every write now fails
        request = pb.SetTrafficRequest(endpoint="ctr-ranker", weights={"1.12": 50, "1.13": 50}, reason="ramp")
        with pytest.raises(grpc.RpcError) as err:
            gw.admin("SetTraffic", request)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert str(tmp_path / "gateway.db") in err.value.details()
        assert gw.gateway.router.table.revision == 1  # nothing half-applied
        assert gw.predict().route_revision == 1  # serving goes on (fail static)
        store._db.execute("PRAGMA query_only = OFF")
        assert gw.admin("SetTraffic", request).revision == 2


def test_processes_creating_one_new_store_together_all_open_it(tmp_path: Path) -> None:
    """`--workers N` (or N `gateway serve`) on a store file that does not exist yet: none sees a half-made file."""
    opened: list[SqliteStore] = []
    errors: list[BaseException] = []

    def open_together(path: Path, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            opened.append(SqliteStore(path))
        except BaseException as err:  # collected for the assertion below
            errors.append(err)

    for round_ in range(5):  # the race is at the first open: a fresh path each round
        path, barrier = tmp_path / f"round{round_}" / "gateway.db", threading.Barrier(8)
        threads = [threading.Thread(target=open_together, args=(path, barrier)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not [p.name for p in path.parent.iterdir() if ".new-" in p.name]  # no temporary file left
    assert errors == [] and len(opened) == 40
    for store in opened:
        store.close()
