"""Incident records in a real SQLite store: ids, listing per endpoint, the traffic format."""

from __future__ import annotations

from pathlib import Path

from gateway.orchestration.incidents import Incident, IncidentLog
from gateway.routing import format_traffic
from gateway.state.sqlite import SqliteStore

AT = 1_800_000_000.0


def incident(log: IncidentLog, endpoint: str, at: float) -> Incident:
    record = Incident(log.new_id(endpoint, at), endpoint, at, "rollback", "1.13", "1.12", [], 1)
    log.save(record)
    return record


def test_ids_stay_unique_across_restarts(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    first = incident(IncidentLog(store), "ctr-ranker", AT)
    second = incident(IncidentLog(store), "ctr-ranker", AT)  # a restarted gateway, the same second
    assert first.id != second.id and first.id.startswith("20270115-080000-ctr-ranker-")
    assert {i.id for i in IncidentLog(store).list()} == {first.id, second.id}
    store.close()


def test_listing_one_endpoint_reads_past_the_others(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    log = IncidentLog(store)
    old = [incident(log, "ctr-ranker", AT + i) for i in range(3)]
    for i in range(20):
        incident(log, "search", AT + 100 + i)
    listed = log.list("ctr-ranker", limit=2)
    assert [i.id for i in listed] == [old[2].id, old[1].id]
    assert len(log.list("ctr-ranker", limit=10)) == 3 and len(log.list(limit=5)) == 5
    store.close()


def test_traffic_reads_the_same_everywhere() -> None:
    assert format_traffic({"1.13": 10, "1.12": 90}) == "1.12 90%, 1.13 10%"
    assert format_traffic({}) == "(none)"
