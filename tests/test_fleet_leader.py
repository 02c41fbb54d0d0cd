"""The guardian acts only as the fleet's leader, and a leader that lost its lock writes nothing (in-process, SQLite)."""

from __future__ import annotations

import pytest

from gateway.errors import LockLost
from gateway.orchestration.fleet import Fleet, Member
from gateway.orchestration.fleet_windows import FleetWindows, GuardianLeadership
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import RunningGateway, running_gateway

CANARY, STABLE = SeriesKey("ctr-ranker", "1.13"), SeriesKey("ctr-ranker", "1.12")


def _member(fleet: Fleet, name: str) -> Fleet:
    fleet.me = Member(fleet.member_id, name, "", 0.0)
    fleet.step()
    return fleet


def _breach(running: RunningGateway) -> None:
    running.gateway.control.set_guardrails("oncall", "ctr-ranker", ["error_rate > 20% for 30s min 20"], reason="test")
    windows = running.gateway.telemetry.windows
    for _ in range(30):
        windows.window(CANARY).record(0.001, "INTERNAL")
        windows.window(STABLE).record(0.001, "OK")


def test_only_the_leader_acts_on_a_breach() -> None:
    with running_gateway() as running:
        gateway = running.gateway
        _breach(running)
        leader = _member(Fleet(gateway.store), "leader")
        follower = _member(Fleet(gateway.store), "follower")
        assert leader.is_leader() and not follower.is_leader() and follower.leader == leader.member_id
        gateway.guardian.lead(GuardianLeadership(follower, FleetWindows(gateway.telemetry.windows, follower.member_id)))
        assert gateway.guardian.tick().incidents == []
        assert gateway.control.state.endpoint("ctr-ranker").weights["1.13"] == 10
        gateway.guardian.lead(GuardianLeadership(leader, FleetWindows(gateway.telemetry.windows, leader.member_id)))
        (incident,) = gateway.guardian.tick().incidents
        assert incident.outcome.startswith("rolled back")
        assert dict(gateway.control.state.endpoint("ctr-ranker").weights) == {"1.12": 100}


def test_a_leader_that_lost_its_lock_unknowingly_writes_nothing() -> None:
    with running_gateway() as running:
        gateway = running.gateway
        _breach(running)
        paused = _member(Fleet(gateway.store, lease_seconds=600), "paused")
        gateway.guardian.lead(GuardianLeadership(paused, FleetWindows(gateway.telemetry.windows, paused.member_id)))
        # Its lease ran out while it was paused, and another process took over; it has not noticed.
        gateway.store.leave(paused.member_id)
        other = _member(Fleet(gateway.store), "other")
        assert other.leader == other.member_id and paused.is_leader()
        revision = gateway.control.revision
        with pytest.raises(LockLost, match="no longer holds guardian-leader"):
            gateway.guardian.tick()
        assert gateway.incidents.list("ctr-ranker") == []
        assert gateway.control.revision == revision
        assert gateway.control.state.endpoint("ctr-ranker").weights["1.13"] == 10
