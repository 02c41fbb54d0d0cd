"""The StateStore contract, run against both stores: SQLite (a file) and etcd (a real server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import Conflict, InvalidInput, NotFound, RecordChanged, StoreUnavailable
from gateway.state import AuditDraft, StateStore, StoreHealth, open_store
from gateway.state.etcd import EtcdStore
from gateway.state.etcd_client import EtcdSettings
from gateway.state.sqlite import SqliteStore
from testkit.etcd import EtcdServer, free_port


def draft(action: str = "set-traffic", endpoint: str = "ctr-ranker", before: int = 0, at: float = 1.0) -> AuditDraft:
    return AuditDraft(at, "oncall", action, endpoint, "why", False, before, [{"path": "x", "after": 1}], {"k": "v"})


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        opened: StateStore = SqliteStore(tmp_path / "state.db")
    else:
        opened = open_store(request.getfixturevalue("etcd").url())
    yield opened
    opened.close()


def test_commits_in_order_with_compare_and_swap(store: StateStore) -> None:
    assert store.latest() is None
    first, entry = store.commit(0, '{"v": 1}', draft(before=0))
    assert (first.revision, entry.revision_before, entry.revision_after) == (1, 0, 1)
    second, _ = store.commit(1, '{"v": 2}', draft(before=1))
    assert second.revision == 2
    latest = store.latest()
    assert latest is not None and (latest.revision, latest.document) == (2, '{"v": 2}')
    assert store.get_revision(1).document == '{"v": 1}'
    assert [r.revision for r in store.revisions(10)] == [2, 1]
    with pytest.raises(Conflict, match=r"revision 2, expected 1"):
        store.commit(1, '{"v": "lost"}', draft(before=1))
    with pytest.raises(Conflict, match=r"revision 2, expected 3"):
        store.commit(3, '{"v": "ahead"}', draft(before=3))
    with pytest.raises(NotFound, match="no revision 9; revisions run from 1 to 2"):
        store.get_revision(9)
    assert [r.revision for r in store.revisions(10)] == [2, 1]  # the losers left nothing behind


def test_audit_is_newest_first_and_filters_by_endpoint(store: StateStore) -> None:
    store.commit(0, "{}", draft("seed", "ctr-ranker"))
    store.append_audit(draft("dry", "ctr-ranker", before=1))
    store.commit(1, "{}", draft("label", "other", before=1))
    entries = store.audit(limit=10)
    assert [e.action for e in entries] == ["label", "dry", "seed"]
    assert entries[0].id > entries[1].id > entries[2].id
    assert entries[2].changes == [{"path": "x", "after": 1}] and entries[2].detail == {"k": "v"}
    assert [e.action for e in store.audit("ctr-ranker", 10)] == ["dry", "seed"]
    assert [e.action for e in store.audit(limit=1)] == ["label"]
    assert store.audit("ctr", 10) == []  # an exact endpoint, not a prefix


def test_records_and_a_record_committed_with_its_audit(store: StateStore) -> None:
    assert store.get_record("rollout", "ctr-ranker") is None
    store.put_record("rollout", "ctr-ranker", '{"step": 0}', 1.0)
    store.put_record("rollout", "ctr-ranker", '{"step": 1}', 3.0)
    store.put_record("rollout", "other/with slash", '{"step": 5}', 2.0)
    entry = store.commit_record(
        "pointer", "scores", '{"run": "r1"}', 4.0, draft("publish", "scores", before=0), version=0
    )
    assert store.get_record("rollout", "ctr-ranker") == '{"step": 1}'
    assert store.list_records("rollout") == [
        ("ctr-ranker", 3.0, '{"step": 1}'),
        ("other/with slash", 2.0, '{"step": 5}'),
    ]
    assert store.list_records("rollout", limit=1) == [("ctr-ranker", 3.0, '{"step": 1}')]
    assert store.get_record("pointer", "scores") == '{"run": "r1"}'
    assert store.audit("scores", 5)[0].id == entry.id


def test_a_record_committed_with_its_audit_is_compare_and_swap(store: StateStore) -> None:
    store.commit_record("pointer", "scores", '{"run": "r1"}', 1.0, draft("publish", "scores"), version=0)
    held = store.read_record("pointer", "scores")
    assert held is not None and held[0] == '{"run": "r1"}'
    with pytest.raises(RecordChanged, match="expected no record"):  # it exists: a first publish lost a race
        store.commit_record("pointer", "scores", '{"run": "r0"}', 2.0, draft("publish", "scores"), version=0)
    store.commit_record("pointer", "scores", '{"run": "r2"}', 3.0, draft("publish", "scores"), version=held[1])
    with pytest.raises(RecordChanged, match=f"expected version {held[1]}"):  # read before r2 was written
        store.commit_record("pointer", "scores", '{"run": "r3"}', 4.0, draft("freeze", "scores"), version=held[1])
    assert store.get_record("pointer", "scores") == '{"run": "r2"}'
    assert [e.action for e in store.audit("scores", 10)] == ["publish", "publish"]  # neither lost write is audited


def test_wait_for_change_returns_what_another_writer_commits(store: StateStore, tmp_path: Path) -> None:
    store.commit(0, '{"v": 1}', draft())
    never = threading.Event()
    assert [r.revision for r in store.wait_for_change(0, 5, never)] == [1]  # already there: no wait
    assert store.wait_for_change(1, 0.2, never) == []  # nothing new in time
    other = open_store(store.url) if isinstance(store, EtcdStore) else SqliteStore(tmp_path / "state.db")
    seen: list[int] = []
    waiter = threading.Thread(target=lambda: seen.extend(r.revision for r in store.wait_for_change(1, 30, never)))
    waiter.start()
    other.commit(1, '{"v": 2}', draft(before=1))
    waiter.join(30)
    assert seen == [2]
    other.close()


def test_a_stopping_wait_ends_when_woken(store: StateStore) -> None:
    stop = threading.Event()
    done = threading.Event()

    def wait() -> None:
        store.wait_for_change(0, 120, stop)
        done.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    stop.set()
    store.wake()
    waiter.join(10)  # far below the 120 s the wait asked for
    assert done.is_set()


def test_etcd_follower_reads_the_current_state_after_compaction(etcd: EtcdServer) -> None:
    store = open_store(etcd.url())
    for revision in range(3):
        store.commit(revision, f'{{"v": {revision + 1}}}', draft(before=revision))
    etcd.compact()
    # A follower that last saw revision 1 still gets every newer revision: they are keys, not history.
    assert [r.revision for r in store.wait_for_change(1, 5, threading.Event())] == [2, 3]
    store.close()


def test_etcd_watch_started_before_a_compaction_point_reloads(etcd: EtcdServer) -> None:
    """Fault injection: the range's etcd revision is compacted before the watch starts."""
    store = open_store(etcd.url())
    assert isinstance(store, EtcdStore)
    store.commit(0, "{}", draft())
    client = store._client
    original = client.watch_once

    def compact_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        etcd.call("/v3/kv/put", {"key": "L3g=", "value": "MQ=="})  # move etcd's revision on
        etcd.compact()
        return original(*args, **kwargs)

    client.watch_once = compact_first  # type: ignore[method-assign]
    assert store.wait_for_change(1, 5, threading.Event()) == []  # told to range again, not an error
    client.watch_once = original  # type: ignore[method-assign]
    store.commit(1, "{}", draft(before=1))
    assert [r.revision for r in store.wait_for_change(1, 5, threading.Event())] == [2]
    store.close()


def test_an_unreachable_etcd_raises_store_unavailable_naming_it() -> None:
    url = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/gw"
    store = open_store(url)
    with pytest.raises(StoreUnavailable, match=rf"the state store {url} is unreachable"):
        store.latest()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.commit(0, "{}", draft())
    with pytest.raises(StoreUnavailable):
        store.wait_for_change(0, 1, threading.Event())
    store.close()


def test_etcd_fails_over_to_a_live_endpoint(etcd: EtcdServer) -> None:
    url = f"etcd://127.0.0.1:{free_port()},{etcd.endpoint}/failover-{free_port()}"
    store = open_store(url)
    revision, _ = store.commit(0, "{}", draft())
    assert revision.revision == 1 and store.latest() == revision
    store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("etcd://", "names no etcd endpoint"),
        ("etcd://localhost", "'localhost' is not HOST:PORT"),
        ("etcd://a:1,b:x/p", "'b:x' is not HOST:PORT"),
        ("etcd://user:pw@a:1", "carries credentials; set GATEWAY_ETCD_USER"),
        ("etcd://a:1?cacert=/ca.pem", "certificate files need TLS; use etcds://"),
        ("etcds://a:1?bogus=1", "unknown option 'bogus'; valid: cacert, cert, key"),
        ("redis://a:1", "is not supported; use sqlite:///PATH"),
    ],
)
def test_bad_store_urls_say_what_is_valid(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        open_store(url, {})


def test_etcd_settings_from_url_and_environment() -> None:
    settings = EtcdSettings.from_url(
        "etcds://e1:2379,e2:2379/prod/gateway/?cacert=/ca.pem&cert=/c.pem&key=/k.pem",
        {"GATEWAY_ETCD_USER": "gw", "GATEWAY_ETCD_PASSWORD": "secret"},
    )
    assert settings.endpoints == ("e1:2379", "e2:2379")
    assert (settings.prefix, settings.tls, settings.cacert, settings.cert, settings.key) == (
        "/prod/gateway", True, "/ca.pem", "/c.pem", "/k.pem",
    )  # fmt: skip
    assert (settings.user, settings.password) == ("gw", "secret")
    assert settings.url == "etcds://e1:2379,e2:2379/prod/gateway"  # no credentials
    assert "secret" not in repr(settings)
    assert EtcdSettings.from_url("etcd://e1:2379", {}).prefix == "/gateway"


def test_store_health_reports_changes_once() -> None:
    now = [10.0]
    health = StoreHealth("etcd://x:1/gw", clock=lambda: now[0])
    seen = []
    health.on_change(lambda status: seen.append((status.connected, status.since, status.error)))
    health.reached()
    now[0] = 11.0
    health.lost("unreachable")
    now[0] = 12.0
    health.lost("still unreachable")
    now[0] = 13.0
    health.reached()
    assert seen == [(False, 11.0, "unreachable"), (True, 13.0, "")]
    assert health.status.connected and health.status.since == 13.0
