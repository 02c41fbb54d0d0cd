"""Batch pointer moves racing each other from two processes on one store (SQLite file, or etcd).

Each side has its own store connection and `BatchPointers`, as two `gateway batch` processes
would. The interleaving is staged, not timed (as in tests/test_rollout_races.py): our next
`commit_record` first runs the other side's whole move, so ours always writes second, after it
read the pointer. It must write nothing, then decide again on the pointer as it now is, or refuse.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq
import pytest

from gateway.batch.gates import Run
from gateway.batch.pointer import POINTER, RACE_TRIES, BatchPointers
from gateway.config import BatchGatesConfig
from gateway.errors import Conflict, FailedPrecondition
from gateway.repository import ModelRepository
from gateway.state import StateStore, open_store
from gateway.state.sqlite import SqliteStore
from testkit.gateways import MODELS
from tests.test_batch import run_score, table
from tests.test_rollout_races import before_next

EP = "ctr-ranker"
GATES = BatchGatesConfig()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Three nights that pass their gates against each other, and one shifted by the one-hot bug."""
    root = tmp_path_factory.mktemp("batch-races")
    repository = ModelRepository(MODELS)
    scored = {}
    for run_id, seed, bug in (("n1", 41, False), ("n2", 42, False), ("n3", 43, False), ("shifted", 44, True)):
        data = root / f"{run_id}.parquet"
        pq.write_table(table(3_000, seed=seed, one_hot_bug=bug), data)
        scored[run_id] = Run.load(run_score(root, repository, data, run_id).path)
    return scored


class Sides(NamedTuple):
    ours: BatchPointers
    store: StateStore  # ours, where the race is staged
    theirs: BatchPointers
    their_store: StateStore


@pytest.fixture(params=["sqlite", "etcd"])
def sides(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sides]:
    url = request.getfixturevalue("etcd").url() if request.param == "etcd" else ""
    ticks = itertools.count(1_000)

    def clock() -> float:  # one clock for both sides: every move is later than the one before
        return float(next(ticks))

    def store() -> StateStore:
        return SqliteStore(tmp_path / "state.db") if request.param == "sqlite" else open_store(url)

    with ExitStack() as stack:
        ours, theirs = store(), store()
        stack.callback(ours.close)
        stack.callback(theirs.close)
        yield Sides(BatchPointers(ours, clock=clock), ours, BatchPointers(theirs, clock=clock), theirs)


def chain(pointers: BatchPointers) -> list[tuple[str | None, str]]:
    """(before, after) of every pointer move, oldest first; each move starts where the previous one ended."""
    moves = [(e.changes[0]["before"], e.changes[0]["after"]) for e in reversed(pointers.history(EP))]
    for (_, after), (before, _) in itertools.pairwise(moves):
        assert before == after, f"an audit entry's before is not the previous entry's after: {moves}"
    return moves


def test_a_freeze_that_lands_between_a_publishs_read_and_write_is_kept(sides: Sides, runs: dict[str, Run]) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    ran = before_next(sides.store, "commit_record", lambda: sides.theirs.freeze("oncall", EP, reason="scores shifted"))
    with pytest.raises(FailedPrecondition, match=r"was frozen meanwhile \(by oncall: scores shifted\); nothing"):
        sides.ours.publish("nightly", EP, runs["n2"], GATES)
    assert ran == ["commit_record"]
    current = sides.theirs.current(EP)
    assert (current.run_id, current.frozen) == ("n1", True)
    assert chain(sides.theirs) == [(None, "n1"), ("n1", "n1")]
    assert sides.ours.record(EP, "n2").status == "validated"  # not published


def test_two_racing_publishes_leave_one_pointer_and_an_unbroken_audit_chain(sides: Sides, runs: dict[str, Run]) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    ran = before_next(sides.store, "commit_record", lambda: sides.theirs.publish("backfill", EP, runs["n3"], GATES))
    gates = sides.ours.publish("nightly", EP, runs["n2"], GATES)
    assert ran == ["commit_record"]
    # Decided again: its gates compared it with n3, the run consumers read when it moved them.
    assert {g.name: g.detail for g in gates}["ks_statistic"] == "scores vs n3"
    assert sides.theirs.current(EP).run_id == "n2"
    assert chain(sides.theirs) == [(None, "n1"), ("n1", "n3"), ("n3", "n2")]


def test_a_publish_is_refused_by_the_gates_against_the_run_published_meanwhile(
    sides: Sides, runs: dict[str, Run]
) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)

    def forced() -> None:
        sides.theirs.publish("oncall", EP, runs["shifted"], GATES, force=True, reason="new encoder")

    ran = before_next(sides.store, "commit_record", forced)
    with pytest.raises(FailedPrecondition, match="n2 failed its gates: ks_statistic"):  # it passed against n1
        sides.ours.publish("nightly", EP, runs["n2"], GATES)
    assert ran == ["commit_record"]
    assert sides.theirs.current(EP).run_id == "shifted"
    assert chain(sides.theirs) == [(None, "n1"), ("n1", "shifted")]


def test_a_rollback_of_a_run_replaced_meanwhile_is_refused_and_writes_nothing(
    sides: Sides, runs: dict[str, Run]
) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    sides.theirs.publish("nightly", EP, runs["n2"], GATES)
    ran = before_next(sides.store, "commit_record", lambda: sides.theirs.publish("backfill", EP, runs["n3"], GATES))
    with pytest.raises(Conflict, match=r"moved from n2 to n3 meanwhile \(by backfill: gates passed\); nothing was"):
        sides.ours.rollback("oncall", EP, reason="n2 looks wrong")
    assert ran == ["commit_record"]
    assert sides.theirs.current(EP).run_id == "n3"
    assert sides.theirs.record(EP, "n2").status == "published"  # not marked rolled back
    assert chain(sides.theirs) == [(None, "n1"), ("n1", "n2"), ("n2", "n3")]


def test_a_rollback_to_a_named_run_racing_a_freeze_keeps_the_freeze(sides: Sides, runs: dict[str, Run]) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    sides.theirs.publish("nightly", EP, runs["n2"], GATES)
    ran = before_next(sides.store, "commit_record", lambda: sides.theirs.freeze("oncall", EP, reason="hold"))
    back = sides.ours.rollback("oncall", EP, to="n1", reason="compare with n1")
    assert ran == ["commit_record"]
    current = sides.theirs.current(EP)
    assert (back.run_id, back.frozen) == (current.run_id, current.frozen) == ("n1", True)
    assert chain(sides.theirs) == [(None, "n1"), ("n1", "n2"), ("n2", "n2"), ("n2", "n1")]


def test_an_unfreeze_racing_a_rollback_keeps_the_rollback(sides: Sides, runs: dict[str, Run]) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    sides.theirs.publish("nightly", EP, runs["n2"], GATES)
    sides.theirs.freeze("oncall", EP, reason="hold")
    ran = before_next(
        sides.store, "commit_record", lambda: sides.theirs.rollback("oncall", EP, to="n1", reason="n2 is shifted")
    )
    unfrozen = sides.ours.unfreeze("oncall", EP, reason="fixed")
    assert ran == ["commit_record"]
    current = sides.theirs.current(EP)
    assert (unfrozen.run_id, unfrozen.frozen) == (current.run_id, current.frozen) == ("n1", False)
    assert chain(sides.theirs)[-2:] == [("n2", "n1"), ("n1", "n1")]


def test_an_unfreeze_that_lost_to_another_is_refused(sides: Sides, runs: dict[str, Run]) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    sides.theirs.freeze("oncall", EP, reason="hold")
    ran = before_next(sides.store, "commit_record", lambda: sides.theirs.unfreeze("alice", EP, reason="fixed"))
    with pytest.raises(FailedPrecondition, match=r"not frozen \(unfrozen meanwhile by alice: fixed\)"):
        sides.ours.unfreeze("bob", EP, reason="fixed too")
    assert ran == ["commit_record"]
    assert [e.actor for e in sides.theirs.history(EP)] == ["alice", "oncall", "nightly"]


def test_a_pointer_that_never_stops_changing_gives_up_with_aborted(sides: Sides, runs: dict[str, Run]) -> None:
    sides.theirs.publish("nightly", EP, runs["n1"], GATES)
    real = sides.store.commit_record
    touches: list[str] = []

    def contended(*args: Any, **kwargs: Any) -> Any:
        # Another process rewrites the pointer before every attempt of ours.
        body = sides.their_store.get_record(POINTER, EP)
        assert body is not None
        sides.their_store.put_record(POINTER, EP, body, 2_000.0 + len(touches))
        touches.append(body)
        return real(*args, **kwargs)

    sides.store.commit_record = contended  # type: ignore[method-assign]
    with pytest.raises(Conflict, match=rf"kept changing while this freeze was decided \({RACE_TRIES} tries"):
        sides.ours.freeze("oncall", EP, reason="hold")
    assert len(touches) == RACE_TRIES
    assert not sides.theirs.current(EP).frozen
    assert [e.action for e in sides.theirs.history(EP)] == ["batch-publish"]


def test_the_cli_reports_a_lost_race_in_one_line_and_exits_1(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    runs: dict[str, Run],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.cli import batch, build_parser

    store = SqliteStore(tmp_path / "state.db")
    request.addfinalizer(store.close)
    theirs = BatchPointers(store)
    theirs.publish("nightly", EP, runs["n1"], GATES)
    theirs.publish("nightly", EP, runs["n2"], GATES)
    real = SqliteStore.commit_record
    staged: list[bool] = []

    def first_lets_another_publish(self: SqliteStore, *args: Any, **kwargs: Any) -> Any:
        if self is not store and not staged:  # the CLI's own store: another process publishes n3 first
            staged.append(True)
            theirs.publish("backfill", EP, runs["n3"], GATES)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SqliteStore, "commit_record", first_lets_another_publish)
    args = build_parser().parse_args(
        ["batch", "rollback", EP, "--reason", "n2 looks wrong", "--store", f"sqlite:///{tmp_path / 'state.db'}"]
    )
    assert batch.run(args) == 1
    err = capsys.readouterr().err
    assert staged and err.count("\n") == 1, err
    assert err.startswith("error: ABORTED: ctr-ranker's batch pointer moved from n2 to n3 meanwhile"), err
    assert theirs.current(EP).run_id == "n3"
