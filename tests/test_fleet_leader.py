"""The guardian acts only as the fleet's leader, and a leader that lost its lock writes nothing (in-process, SQLite)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import parse_route_file
from gateway.errors import LockLost
from gateway.orchestration.fleet import Fleet, Member
from gateway.orchestration.fleet_windows import FleetWindows, GuardianLeadership, Pulled
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import SeriesKey, WindowStore
from testkit.gateways import MODELS, RunningGateway, config_text, running_gateway

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


class Leak:
    """A fake resident-memory reader (fault injection): flat, then 1 MB more per read once started."""

    def __init__(self) -> None:
        self.rss = 400_000_000
        self.growing = False

    def __call__(self) -> int:
        if self.growing:
            self.rss += 1_000_000
        return self.rss


def test_memory_growth_of_a_process_that_does_not_lead_rolls_the_canary_back(tmp_path: Path) -> None:
    clock = SimClock()
    config = parse_route_file(config_text(guardrails='["memory_growth > 200MB for 10m"]'), base_dir=MODELS)
    flat = MemoryWindow(3600, clock=clock, reader=lambda: 300_000_000)
    telemetry = Telemetry(WindowStore(3600, clock=clock), memory=flat)
    leader = Gateway(config, SqliteStore(tmp_path / "state.db"), telemetry=telemetry, clock=clock)
    leader.start()
    # Another process of the fleet (simulated: its windows and memory, pulled as the wire would carry them).
    leak = Leak()
    other_windows, other_memory = WindowStore(3600, clock=clock), MemoryWindow(3600, clock=clock, reader=leak)
    other = Member("other", "host-b pid 7", "host-b:1", 0.0)

    def puller(asks: Sequence[tuple[Member, int]]) -> list[Pulled | None]:
        return [Pulled(*other_windows.export(since), 0, other_memory.export(since)) for _, since in asks]

    fleet = _member(Fleet(leader.store, lease_seconds=600), "leader")
    windows = FleetWindows(leader.telemetry.windows, fleet.member_id, puller)
    leader.guardian.lead(_WithOther(GuardianLeadership(fleet, windows), other))
    clock.advance(5)  # 1.13 is seen serving after every version loaded: timing points at it
    incidents = []
    for second in range(700):
        leak.growing = second >= 200
        other_memory.sample()
        incidents += leader.guardian.tick().incidents
        clock.advance(1)
    (incident,) = incidents
    assert dict(leader.control.state.endpoint("ctr-ranker").weights) == {"1.12": 100}
    (verdict,) = incident.verdicts
    assert verdict["status"] == "breach"
    assert "the resident memory of process host-b pid 7 grew" in verdict["detail"]
    assert "attributed to 1.13 by timing only" in verdict["detail"]
    leader.close()


class _WithOther:
    """The leadership, with one more member listed beside this process (a simulated one)."""

    def __init__(self, leadership: GuardianLeadership, other: Member) -> None:
        self._leadership = leadership
        self._other = other
        real = leadership._fleet.members
        leadership._fleet.members = lambda: [*real(), other]  # type: ignore[method-assign]

    def term(self):  # type: ignore[no-untyped-def]
        return self._leadership.term()

    def memory(self):  # type: ignore[no-untyped-def]
        return self._leadership.memory()

    def drift(self):  # type: ignore[no-untyped-def]
        return self._leadership.drift()
