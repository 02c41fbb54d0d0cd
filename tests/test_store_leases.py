"""Membership, locks, fenced writes and record swaps, against both stores: SQLite (a file) and etcd (a real server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.clock import SimClock
from gateway.errors import Conflict, LockLost, RecordChanged
from gateway.state import AuditDraft, RecordSwap, StateStore, fenced, open_store, swapping
from gateway.state.sqlite import SqliteStore
from testkit.fleet import wait_until


def draft(before: int = 0) -> AuditDraft:
    return AuditDraft(1.0, "guardian", "rollback", "ctr-ranker", "guardrail", False, before)


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        opened: StateStore = SqliteStore(tmp_path / "state.db")
    else:
        opened = open_store(request.getfixturevalue("etcd").url())
    yield opened
    opened.close()


def test_members_join_renew_and_leave(store: StateStore) -> None:
    store.join("a", '{"address": "h:1"}', 10)
    store.join("b", '{"address": "h:2"}', 10)
    assert store.members() == [("a", '{"address": "h:1"}'), ("b", '{"address": "h:2"}')]
    assert store.renew("a") and store.renew("b")
    store.leave("a")
    assert store.members() == [("b", '{"address": "h:2"}')]
    assert not store.renew("a")  # gone: it must join again
    store.join("a", '{"address": "h:3"}', 10)
    assert dict(store.members())["a"] == '{"address": "h:3"}'


def test_a_lock_is_held_while_its_holder_lives(store: StateStore) -> None:
    assert store.acquire("leader", "a") == ""  # not a member: cannot hold anything
    store.join("a", "{}", 10)
    store.join("b", "{}", 10)
    assert store.acquire("leader", "a") == "a"
    assert store.acquire("leader", "b") == "a"
    assert store.acquire("leader", "a") == "a"  # holding it again changes nothing
    store.leave("a")  # its lock goes with it
    assert store.acquire("leader", "b") == "b"
    assert store.acquire("leader", "a") == "b"


def test_fenced_writes_commit_only_while_the_lock_is_held(store: StateStore) -> None:
    store.join("a", "{}", 10)
    store.join("b", "{}", 10)
    assert store.acquire("leader", "a") == "a"
    with fenced("leader", "a"):
        store.commit(0, '{"v": 1}', draft(0))
        store.put_record("incident", "i1", '{"n": 1}', 1.0)
        store.append_audit(draft(1))
        store.commit_record("rollout", "ctr-ranker", '{"step": 1}', 1.0, draft(1), version=0)
    held = store.read_record("rollout", "ctr-ranker")
    assert held is not None
    store.leave("a")
    assert store.acquire("leader", "b") == "b"
    audit_before = len(store.audit(limit=100))
    with fenced("leader", "a"):
        with pytest.raises(LockLost, match="a no longer holds leader \\(held by b now\\)"):
            store.commit(1, '{"v": 2}', draft(1))
        with pytest.raises(LockLost):
            store.put_record("incident", "i2", '{"n": 2}', 2.0)
        with pytest.raises(LockLost):
            store.append_audit(draft(1))
        with pytest.raises(LockLost):
            store.commit_record("rollout", "ctr-ranker", '{"step": 2}', 2.0, draft(1), version=held[1])
    latest = store.latest()
    assert latest is not None and latest.revision == 1
    assert store.get_record("incident", "i2") is None
    assert store.get_record("rollout", "ctr-ranker") == '{"step": 1}'
    assert len(store.audit(limit=100)) == audit_before
    store.put_record("incident", "i3", "{}", 3.0)  # outside the fence: anyone writes
    with fenced("leader", "b"):
        store.commit(1, '{"v": 2}', draft(1))


def test_create_record_keeps_the_first_writers_body(store: StateStore) -> None:
    assert store.create_record("fleet", "key", "first", 1.0) == "first"
    assert store.create_record("fleet", "key", "second", 2.0) == "first"
    assert store.get_record("fleet", "key") == "first"


def test_sqlite_members_expire_without_renewal(tmp_path: Path) -> None:
    clock = SimClock(1_000_000.0)
    store = SqliteStore(tmp_path / "state.db", clock=clock)
    other = SqliteStore(tmp_path / "state.db", clock=clock)  # another process on the same file
    store.join("a", "{}", 5)
    assert store.acquire("leader", "a") == "a"
    other.join("b", "{}", 5)
    clock.now += 4
    assert other.renew("b")
    clock.now += 2  # a's 5 s are up
    assert [m for m, _ in other.members()] == ["b"]
    assert not store.renew("a")
    assert other.acquire("leader", "b") == "b"
    with fenced("leader", "a"), pytest.raises(LockLost):
        store.put_record("incident", "late", "{}", 1.0)
    store.close()
    other.close()


@pytest.mark.slow
def test_etcd_members_and_locks_expire_with_their_lease(etcd) -> None:  # type: ignore[no-untyped-def]
    store = open_store(etcd.url())
    other = open_store(store.url)
    try:
        store.join("a", "{}", 2)
        other.join("b", "{}", 30)
        assert store.acquire("leader", "a") == "a"
        assert wait_until(lambda: [m for m, _ in other.members()] == ["b"], timeout=30, interval=0.1)
        assert not store.renew("a")
        assert other.acquire("leader", "b") == "b"
    finally:
        store.close()
        other.close()


def test_record_swaps_compare_the_version_every_write_changes(store: StateStore) -> None:
    assert store.read_record("rollout", "ctr-ranker") is None
    with pytest.raises(RecordChanged, match="expected version 7"):
        store.swap_record("rollout", "ctr-ranker", "lost", 1.0, 7)  # it does not exist
    first = store.swap_record("rollout", "ctr-ranker", "a", 1.0, 0)
    assert store.read_record("rollout", "ctr-ranker") == ("a", first)
    with pytest.raises(RecordChanged, match="must not exist|expected no record"):
        store.swap_record("rollout", "ctr-ranker", "again", 1.0, 0)
    second = store.swap_record("rollout", "ctr-ranker", "b", 2.0, first)
    assert second != first
    with pytest.raises(RecordChanged):
        store.swap_record("rollout", "ctr-ranker", "stale", 3.0, first)  # read before `b` was written
    store.put_record("rollout", "ctr-ranker", "c", 4.0)  # a plain write changes the version too
    held = store.read_record("rollout", "ctr-ranker")
    assert held is not None and held[0] == "c" and held[1] != second
    with pytest.raises(RecordChanged):
        store.swap_record("rollout", "ctr-ranker", "stale", 5.0, second)
    assert store.get_record("rollout", "ctr-ranker") == "c"


def test_a_record_swap_rides_on_a_commit_or_an_audit_entry_or_neither_is_written(store: StateStore) -> None:
    version = store.swap_record("rollout", "ctr-ranker", "step 0", 1.0, 0)
    with swapping(RecordSwap("rollout", "ctr-ranker", "step 1", 2.0, version)) as swap:
        revision, _ = store.commit(0, '{"v": 1}', draft(0))
        store.append_audit(draft(1))  # the swap is spent: a later write in the block carries nothing
    held = store.read_record("rollout", "ctr-ranker")
    assert held == ("step 1", swap.written) and swap.written != version
    audit = len(store.audit(limit=100))
    # Stale: neither the revision nor its audit entry nor the record is written.
    with swapping(RecordSwap("rollout", "ctr-ranker", "stale", 3.0, version)) as stale:
        with pytest.raises(RecordChanged):
            store.commit(1, '{"v": 2}', draft(1))
        with pytest.raises(RecordChanged):
            store.append_audit(draft(1))
    assert stale.written == 0
    latest = store.latest()
    assert latest is not None and latest.revision == revision.revision == 1
    assert len(store.audit(limit=100)) == audit
    assert store.read_record("rollout", "ctr-ranker") == held
    # On an audit entry, under the leader's fence: both checks in one transaction.
    store.join("a", "{}", 10)
    assert store.acquire("leader", "a") == "a"
    with fenced("leader", "a"), swapping(RecordSwap("rollout", "ctr-ranker", "paused", 4.0, swap.written)) as note:
        store.append_audit(draft(1))
    assert store.read_record("rollout", "ctr-ranker") == ("paused", note.written)
    assert len(store.audit(limit=100)) == audit + 1
    # A route conflict is a Conflict, not a changed record: the record is not written either.
    with swapping(RecordSwap("rollout", "ctr-ranker", "x", 5.0, note.written)), pytest.raises(Conflict) as err:
        store.commit(0, '{"v": 2}', draft(0))
    assert not isinstance(err.value, RecordChanged)
    assert store.get_record("rollout", "ctr-ranker") == "paused"


def test_a_sqlite_store_from_before_record_versions_gains_them(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the schema before records had a version
        db.executescript(
            "CREATE TABLE revisions (revision INTEGER PRIMARY KEY, at REAL NOT NULL, document TEXT NOT NULL);"
            "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,"
            " action TEXT NOT NULL, endpoint TEXT NOT NULL, reason TEXT NOT NULL, dry_run INTEGER NOT NULL,"
            " revision_before INTEGER NOT NULL, revision_after INTEGER NOT NULL, changes TEXT NOT NULL,"
            " detail TEXT NOT NULL);"
            "CREATE TABLE records (kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL, body TEXT NOT NULL,"
            " PRIMARY KEY (kind, key));"
            "INSERT INTO records VALUES ('rollout', 'ctr-ranker', 1.0, 'running');"
        )
    db.close()
    store = SqliteStore(path)
    try:
        held = store.read_record("rollout", "ctr-ranker")
        assert held is not None and held[0] == "running"
        assert store.swap_record("rollout", "ctr-ranker", "paused", 2.0, held[1]) == held[1] + 1
    finally:
        store.close()
