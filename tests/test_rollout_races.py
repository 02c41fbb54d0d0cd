"""An operator's rollout change through one process racing the guardian leader's through another.

Two gateways share one store (SQLite file, or etcd), each with its own rollout driver, as two
processes would. The interleaving is staged, not timed: one side's next store write first
runs the other side's whole change, so the first side's write always comes second, after it
read the record. The second writer must write nothing, read the record again and decide again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import parse_route_file
from gateway.errors import Conflict
from gateway.guardrails.rules import RuleSet
from gateway.orchestration.rollout import RACE_TRIES, RolloutStatus
from gateway.state import StateStore, open_store
from gateway.state.sqlite import SqliteStore
from testkit.gateways import MODELS, config_text

NO_RULES = RuleSet.parse([], 1)


@pytest.fixture(params=["sqlite", "etcd"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway, SimClock]]:
    """The leader's process and an operator's, on one store and one (simulated) clock."""
    clock = SimClock()
    config = parse_route_file(config_text(traffic='{"1.12": 100}', labels='{stable: "1.12"}'), base_dir=MODELS)

    def store() -> StateStore:
        if request.param == "sqlite":
            return SqliteStore(tmp_path / "state.db", clock=clock)
        return open_store(url)

    url = request.getfixturevalue("etcd").url() if request.param == "etcd" else ""
    with ExitStack() as stack:
        gateways = []
        for _ in range(2):
            gateway = Gateway(config, store(), clock=clock)
            stack.callback(gateway.close)
            gateway.start()
            gateways.append(gateway)
        yield gateways[0], gateways[1], clock


def before_next(store: StateStore, method: str, other: Callable[[], object]) -> list[str]:
    """Run `other` just before this store's next `method` call goes through (fault injection: a staged race)."""
    real = getattr(store, method)
    ran: list[str] = []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if not ran:
            ran.append(method)
            other()
        return real(*args, **kwargs)

    setattr(store, method, hooked)
    return ran


def start(operator: Gateway, leader: Gateway, clock: SimClock) -> None:
    operator.rollouts.start(
        "alice", "ctr-ranker", "1.14", steps=[10, 50, 100], step_seconds=60, rules=[], reason="ship"
    )
    leader.control.refresh()  # what its follower does: it serves the rollout's first step
    clock.advance(61)  # the first step is due


def traffic(gateway: Gateway) -> dict[str, int]:
    gateway.control.refresh()
    return dict(gateway.control.state.endpoint("ctr-ranker").weights)


def test_a_pause_that_lands_while_the_leader_advances_wins_and_the_advance_writes_nothing(
    pair: tuple[Gateway, Gateway, SimClock],
) -> None:
    leader, operator, clock = pair
    start(operator, leader, clock)
    read = leader.rollouts.get("ctr-ranker")
    assert read is not None and read.status == RolloutStatus.RUNNING
    # The leader decided to advance; the operator's pause commits before the leader's route change does.
    ran = before_next(leader.store, "commit", lambda: operator.rollouts.pause("bob", "ctr-ranker", reason="hold"))
    assert leader.rollouts.advance(read, NO_RULES, []) is None
    assert ran == ["commit"]
    rollout = operator.rollouts.require("ctr-ranker")
    assert (rollout.status, rollout.step_index) == (RolloutStatus.PAUSED, 0)
    assert traffic(leader) == traffic(operator) == {"1.12": 90, "1.14": 10}  # the advance wrote nothing
    assert [e.action for e in leader.store.audit("ctr-ranker")][:2] == ["rollout-pause", "set-traffic"]


def test_a_pause_that_loses_to_the_leaders_advance_pauses_the_new_step(
    pair: tuple[Gateway, Gateway, SimClock],
) -> None:
    leader, operator, clock = pair
    start(operator, leader, clock)

    def advance() -> None:
        read = leader.rollouts.get("ctr-ranker")
        assert read is not None
        assert leader.rollouts.advance(read, NO_RULES, []) is not None

    # The operator read the running rollout; the leader's advance commits before the pause's audit entry.
    ran = before_next(operator.store, "append_audit", advance)
    paused = operator.rollouts.pause("bob", "ctr-ranker", reason="hold")
    assert ran == ["append_audit"]
    assert (paused.status, paused.step_index) == (RolloutStatus.PAUSED, 1)  # decided again, on the new step
    stored = leader.rollouts.require("ctr-ranker")
    assert (stored.status, stored.step_index) == (RolloutStatus.PAUSED, 1)
    assert [e["event"].split(" ")[0] for e in stored.history] == ["started", "advanced", "paused"]
    assert traffic(operator) == {"1.12": 50, "1.14": 50}
    actions = [e.action for e in leader.store.audit("ctr-ranker")]
    assert actions.count("rollout-pause") == 1  # the lost attempt left no audit entry


def test_an_abort_that_lands_while_the_leader_advances_keeps_the_traffic_on_stable(
    pair: tuple[Gateway, Gateway, SimClock],
) -> None:
    leader, operator, clock = pair
    start(operator, leader, clock)
    read = leader.rollouts.get("ctr-ranker")
    assert read is not None
    ran = before_next(leader.store, "commit", lambda: operator.rollouts.abort("bob", "ctr-ranker", reason="stop"))
    assert leader.rollouts.advance(read, NO_RULES, []) is None
    assert ran == ["commit"]
    assert operator.rollouts.require("ctr-ranker").status == RolloutStatus.ABORTED
    assert traffic(leader) == {"1.12": 100}  # not back on the canary after the operator's abort


def test_a_resume_that_lands_while_the_leader_marks_the_rollout_failed_is_overruled_by_the_failure(
    pair: tuple[Gateway, Gateway, SimClock],
) -> None:
    leader, operator, clock = pair
    start(operator, leader, clock)
    operator.rollouts.pause("bob", "ctr-ranker", reason="hold")
    resumed = before_next(
        leader.store, "swap_record", lambda: operator.rollouts.resume("bob", "ctr-ranker", reason="go on")
    )
    failed = leader.rollouts.failed("ctr-ranker", "failed: guardrail error_rate (incident x)")
    assert resumed == ["swap_record"]
    assert failed is not None and failed.status == RolloutStatus.FAILED
    stored = operator.rollouts.require("ctr-ranker")
    events = [e["event"].split(" ")[0] for e in stored.history]
    assert events == ["started", "paused", "resumed", "failed:"]  # the resume is kept in the history


def test_a_record_that_never_stops_changing_gives_up_with_aborted(pair: tuple[Gateway, Gateway, SimClock]) -> None:
    leader, operator, clock = pair
    start(operator, leader, clock)
    real = leader.store.append_audit
    writes = []

    def contended(*args: Any, **kwargs: Any) -> Any:
        # Another writer touches the record before every attempt of this process.
        body = leader.store.get_record("rollout", "ctr-ranker")
        assert body is not None
        operator.store.put_record("rollout", "ctr-ranker", body, clock())
        writes.append(json.loads(body)["status"])
        return real(*args, **kwargs)

    leader.store.append_audit = contended  # type: ignore[method-assign]
    with pytest.raises(Conflict, match="kept changing"):
        leader.rollouts.pause("bob", "ctr-ranker", reason="hold")
    assert len(writes) == RACE_TRIES
    assert operator.rollouts.require("ctr-ranker").status == RolloutStatus.RUNNING
