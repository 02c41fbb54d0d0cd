"""Progressive rollouts: a version ramps 5% -> 25% -> 50% -> 100% while its guardrails pass.

A step advances when its duration has passed and every rule passed with enough samples
(inconclusive holds the step). Reaching 100% promotes the version to stable in one revision. A breach rolls back
and marks the rollout failed (the guardian does that). A change of the endpoint's traffic from
outside the rollout (an operator's rollback, switch, set-traffic, promote or apply) ends it, so
the driver never fights the operator: `aborted`, or `completed` when the version became stable.
The state is a record in the store, so a restarted gateway resumes where it was.

Every change of the record is a compare-and-swap on the version read, committed in the same
transaction as the route change or audit entry that goes with it: an operator pausing through
one process and the guardian leader advancing through another cannot both win. The one that
lost writes nothing, reads the record again and decides again on what it now says.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from gateway.control import ControlPlane, Intent
from gateway.desired import EndpointState
from gateway.errors import Conflict, FailedPrecondition, InvalidInput, LockLost, NotFound
from gateway.guardrails.rules import RuleSet
from gateway.limits import MAX_REASON_CHARS, MAX_STEPS, check_count, check_rules
from gateway.orchestration.evaluate import Status, Verdict
from gateway.routing import CANARY, STABLE, format_traffic
from gateway.state import RecordSwap, swapping

log = logging.getLogger(__name__)
_T = TypeVar("_T")

KIND = "rollout"
DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_STEP_SECONDS = 600.0
MAX_STEP_SECONDS = 30 * 86400.0
ACTOR = "rollout"
#: Times a rollout change is decided again after losing a race for its record, before it gives up (ABORTED).
RACE_TRIES = 5


class RolloutStatus(enum.StrEnum):
    """Where a rollout is: `running` and `paused` are active; the rest are final."""

    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass
class Rollout:
    """One rollout's durable state."""

    endpoint: str
    version: str
    baseline: str
    steps: list[int]
    step_seconds: float
    rules: list[str]
    at_least: int = 1
    status: RolloutStatus = RolloutStatus.RUNNING
    step_index: int = 0
    step_started_at: float = 0.0
    started_at: float = 0.0
    started_by: str = ""
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = RolloutStatus(self.status)  # stored records hold the plain string

    @property
    def active(self) -> bool:
        """Running or paused."""
        return self.status in (RolloutStatus.RUNNING, RolloutStatus.PAUSED)

    @property
    def share(self) -> int:
        """The candidate's current percent."""
        return self.steps[self.step_index]

    def rule_set(self) -> RuleSet:
        """The rollout's guardrails."""
        return RuleSet.parse(self.rules, self.at_least)

    def event(self, at: float, what: str) -> None:
        """Append to the history."""
        self.history.append({"at": at, "event": what})


class RolloutDriver:
    """Starts, advances, pauses and ends rollouts through the control plane.

    `history_seconds` (the telemetry windows' horizon; 0: unchecked) bounds the rules' windows.
    """

    def __init__(
        self, control: ControlPlane, *, clock: Callable[[], float] = time.time, history_seconds: int = 0
    ) -> None:
        self._control = control
        self._store = control.store
        self._clock = clock
        self.history_seconds = history_seconds
        # Serialises every read-modify-write of a rollout record. Taken before the control plane's
        # lock (never from inside a control-plane callback), so the two cannot deadlock.
        self._lock = threading.RLock()

    # --- state -----------------------------------------------------------------------------------

    def get(self, endpoint: str) -> Rollout | None:
        """The endpoint's latest rollout, if any."""
        return self._read(endpoint)[0]

    def _read(self, endpoint: str) -> tuple[Rollout | None, int]:
        """The endpoint's latest rollout and its record's version (0: none)."""
        held = self._store.read_record(KIND, endpoint)
        return (Rollout(**json.loads(held[0])), held[1]) if held else (None, 0)

    def require(self, endpoint: str) -> Rollout:
        """The endpoint's latest rollout, or NotFound."""
        return _required(endpoint, self.get(endpoint))

    def _write(self, rollout: Rollout, version: int, change: Callable[[], object] | None = None) -> None:
        """Store `rollout` if its record is still at `version`, in one transaction with `change`'s write.

        `change` makes the route change or audit entry that goes with the new state; when it
        writes nothing (the routes were already so), the record is swapped alone. RecordChanged:
        another writer came first, and nothing was written.
        """
        swap = RecordSwap(KIND, rollout.endpoint, json.dumps(asdict(rollout)), self._clock(), version)
        with swapping(swap):
            if change is not None:
                change()
        if not swap.written:
            self._store.swap_record(swap.kind, swap.key, swap.body, swap.at, swap.version)

    def _decide(self, endpoint: str, decide: Callable[[Rollout | None, int], _T]) -> _T:
        """`decide(rollout, version)` on the record as stored, again on the new state each time it lost a race.

        A race is lost to another writer of the record (RecordChanged) or of the routes (Conflict;
        the control plane has caught up with them by then).
        """
        for _ in range(RACE_TRIES):
            rollout, version = self._read(endpoint)
            try:
                return decide(rollout, version)
            except LockLost:
                raise  # another process leads now: it decides
            except Conflict as err:  # the record or the routes changed since they were read
                log.info("%s; deciding again on the rollout as it now is", err.message)
        raise Conflict(f"the rollout of {endpoint} kept changing while this change was decided; look at it and retry")

    # --- operator actions ------------------------------------------------------------------------

    def start(
        self,
        actor: str,
        endpoint: str,
        version: str,
        *,
        steps: Sequence[int] = (),
        step_seconds: float = 0,
        rules: Sequence[str] | None = None,
        at_least: int = 0,
        reason: str,
        dry_run: bool = False,
    ) -> Rollout:
        """Begin ramping `version` against the current stable.

        Empty `steps` means DEFAULT_STEPS, 0 `step_seconds` DEFAULT_STEP_SECONDS; `rules` None
        means the endpoint's own guardrails (with their `at_least`), and 0 `at_least` means 1.
        """
        stable, steps, step_seconds, rule_set = self._plan(
            endpoint, version, steps=steps, step_seconds=step_seconds, rules=rules, at_least=at_least
        )

        def decide(existing: Rollout | None, held: int) -> Rollout:
            if existing and existing.active:
                raise FailedPrecondition(
                    f"{endpoint} already has a {existing.status} rollout of {existing.version}; abort it first"
                )
            now = self._clock()
            rollout = Rollout(
                endpoint, version, stable, steps, step_seconds, [r.text for r in rule_set.rules], rule_set.at_least,
                step_started_at=now, started_at=now, started_by=actor, reason=reason,
            )  # fmt: skip

            def first_step() -> object:
                return self._control.set_traffic(
                    actor,
                    endpoint,
                    _weights(stable, version, steps[0]),
                    labels={CANARY: version},
                    reason=_within(f"rollout of {version} step 1/{len(steps)} ({steps[0]}%): ", reason),
                    dry_run=dry_run,
                    trigger="rollout",
                )

            if dry_run:
                first_step()
                return rollout
            rollout.event(now, f"started at {steps[0]}% by {actor}: {reason}")
            self._write(rollout, held, first_step)
            return rollout

        with self._lock:
            return self._decide(endpoint, decide)

    def _plan(
        self,
        endpoint: str,
        version: str,
        *,
        steps: Sequence[int],
        step_seconds: float,
        rules: Sequence[str] | None,
        at_least: int,
    ) -> tuple[str, list[int], float, RuleSet]:
        """A new rollout's baseline, steps, step duration and rules, checked (see `start`)."""
        check_count(len(steps), "steps", MAX_STEPS)
        if rules is not None:
            check_rules(list(rules), "guardrails")
        state = self._control.state.endpoint(endpoint)
        if rules is None:
            rules, at_least = [r.text for r in state.guardrails.rules], at_least or state.guardrails.at_least
        steps = steps or DEFAULT_STEPS
        step_seconds = step_seconds or DEFAULT_STEP_SECONDS
        state.require_version(version)
        stable = state.labels.get(STABLE)
        if not stable:
            raise FailedPrecondition(f"{endpoint} has no stable label to ramp against; label one first")
        if version == stable:
            raise InvalidInput(f"{version} is already stable on {endpoint}")
        steps = [int(s) for s in steps]
        if not steps or steps[-1] != 100 or any(b <= a for a, b in itertools.pairwise(steps)):
            raise InvalidInput(f"steps {steps} must increase and end at 100, e.g. 5,25,50,100", field="steps")
        if steps[0] <= 0:
            raise InvalidInput(f"steps {steps} must start above 0", field="steps")
        if not math.isfinite(step_seconds) or not 0 < step_seconds <= MAX_STEP_SECONDS:
            raise InvalidInput(
                f"step duration {step_seconds} must be a positive number of seconds, at most {MAX_STEP_SECONDS:.0f} "
                "(30 days): a longer step would hold the rollout as if stuck",
                field="step_duration",
            )
        rule_set = RuleSet.parse(list(rules), (at_least or 1) if rules else 1)
        if self.history_seconds:
            rule_set.check_history(self.history_seconds)
        return stable, steps, step_seconds, rule_set

    def pause(self, actor: str, endpoint: str, *, reason: str) -> Rollout:
        """Hold the current step (traffic stays as it is)."""

        def decide(rollout: Rollout | None, held: int) -> Rollout:
            rollout = _required(endpoint, rollout)
            if rollout.status != RolloutStatus.RUNNING:
                raise FailedPrecondition(f"the rollout of {rollout.version} is {rollout.status}, not running")
            rollout.status = RolloutStatus.PAUSED
            rollout.event(self._clock(), f"paused by {actor}: {reason}")
            self._write(rollout, held, lambda: self._control.note(Intent(actor, "rollout-pause", endpoint, reason)))
            return rollout

        with self._lock:
            return self._decide(endpoint, decide)

    def resume(self, actor: str, endpoint: str, *, reason: str) -> Rollout:
        """Continue a paused rollout; the step's clock restarts."""

        def decide(rollout: Rollout | None, held: int) -> Rollout:
            rollout = _required(endpoint, rollout)
            if rollout.status != RolloutStatus.PAUSED:
                raise FailedPrecondition(f"the rollout of {rollout.version} is {rollout.status}, not paused")
            rollout.status = RolloutStatus.RUNNING
            rollout.step_started_at = self._clock()
            rollout.event(rollout.step_started_at, f"resumed by {actor}: {reason}")
            self._write(rollout, held, lambda: self._control.note(Intent(actor, "rollout-resume", endpoint, reason)))
            return rollout

        with self._lock:
            return self._decide(endpoint, decide)

    def abort(self, actor: str, endpoint: str, *, reason: str) -> Rollout:
        """Stop the rollout and send all traffic back to the baseline."""

        def decide(rollout: Rollout | None, held: int) -> Rollout:
            rollout = _required(endpoint, rollout)
            if not rollout.active:
                raise FailedPrecondition(f"the rollout of {rollout.version} is already {rollout.status}")
            baseline = rollout.baseline
            rollout.status = RolloutStatus.ABORTED
            rollout.event(self._clock(), f"aborted by {actor}: {reason}")
            self._write(
                rollout,
                held,
                lambda: self._control.rollback(
                    actor, endpoint, reason=_within("rollout aborted: ", reason), to_version=baseline, trigger="rollout"
                ),
            )
            return rollout

        with self._lock:
            return self._decide(endpoint, decide)

    # --- the guardian's side -------------------------------------------------------------------

    def failed(self, endpoint: str, why: str) -> Rollout | None:
        """Mark an active rollout failed (after a guardrail rolled it back)."""

        def decide(rollout: Rollout | None, held: int) -> Rollout | None:
            if rollout is None or not rollout.active:
                return None
            rollout.status = RolloutStatus.FAILED
            rollout.event(self._clock(), why)
            self._write(rollout, held)
            return rollout

        with self._lock:
            return self._decide(endpoint, decide)

    def reconcile(self, ep: EndpointState, rollout: Rollout | None) -> Rollout | None:
        """End an active rollout whose traffic was changed from outside it; the rollout as it now is.

        `rollout` is the record as the caller read it; it is read again before it is changed.
        """
        if rollout is None or not rollout.active or _on_plan(ep, rollout):
            return rollout

        def decide(rollout: Rollout | None, held: int) -> Rollout | None:
            current = self._control.state.endpoints.get(ep.name)
            if rollout is None or not rollout.active or current is None or _on_plan(current, rollout):
                return rollout
            promoted = current.labels.get(STABLE) == rollout.version
            rollout.status = RolloutStatus.COMPLETED if promoted else RolloutStatus.ABORTED
            why = f"traffic changed outside the rollout (now {format_traffic(current.weights)})"
            rollout.event(self._clock(), f"ended ({rollout.status}): {why}")
            intent = Intent(ACTOR, "rollout-end", ep.name, f"rollout of {rollout.version} ended: {why}")
            self._write(rollout, held, lambda: self._control.note(intent))
            return rollout

        with self._lock:
            return self._decide(ep.name, decide)

    def advance(self, rollout: Rollout, rules: RuleSet, verdicts: Sequence[Verdict]) -> Rollout | None:
        """Move to the next step when the step's time is up and every rule that gates it passed.

        `rules` are the rules the guardian evaluated for the rollout; those for a canary gate the
        step (observe-only rules never do). `rollout` is the record as the caller read it; the
        step's time and place are checked again on the record as stored before it moves.
        """
        now = self._clock()
        if not _due(rollout, now):
            return None
        gates = () if rules.observe_only else rules.canary_rules
        mine = [v for v in verdicts if v.candidate == rollout.version]
        if gates and (len(mine) < len(gates) or any(v.status is not Status.PASS for v in mine)):
            return None  # breaching or inconclusive: hold the step

        def decide(current: Rollout | None, held: int) -> Rollout | None:
            if current is None or (current.version, current.step_index) != (rollout.version, rollout.step_index):
                return None  # changed since the caller read it
            if not _due(current, now):
                return None  # paused, ended, or resumed with the step's clock restarted
            ep = self._control.state.endpoints.get(rollout.endpoint)
            if ep is None or not _on_plan(ep, current):
                return None  # an operator changed the traffic: `reconcile` ends the rollout
            return self._next_step(current, held, now)

        with self._lock:
            return self._decide(rollout.endpoint, decide)

    def _next_step(self, rollout: Rollout, held: int, now: float) -> Rollout:
        endpoint = rollout.endpoint
        next_share = rollout.steps[rollout.step_index + 1] if rollout.step_index + 1 < len(rollout.steps) else 100
        if next_share < 100:
            rollout.step_index += 1
            rollout.step_started_at = now
            rollout.event(now, f"advanced to {next_share}%")
            reason = f"rollout of {rollout.version}: step {rollout.step_index + 1} ({next_share}%)"
            weights = _weights(rollout.baseline, rollout.version, next_share)
            self._write(
                rollout,
                held,
                lambda: self._control.set_traffic(ACTOR, endpoint, weights, reason=reason, trigger="rollout"),
            )
        else:
            # The last step is 100%: the version becomes stable in the same revision. (At 100% there
            # is no baseline traffic left to compare with, so the rules were checked one step before.)
            rollout.step_index = len(rollout.steps) - 1
            rollout.status = RolloutStatus.COMPLETED
            rollout.event(now, f"promoted {rollout.version} to stable at 100%")
            reason = f"rollout of {rollout.version} completed"
            self._write(rollout, held, lambda: self._control.promote(ACTOR, endpoint, reason=reason, trigger="rollout"))
        return rollout


def _within(prefix: str, reason: str) -> str:
    """`prefix + reason`, the reason cut so the whole stays within the audit log's limit."""
    return prefix + reason[: max(0, MAX_REASON_CHARS - len(prefix))]


def _required(endpoint: str, rollout: Rollout | None) -> Rollout:
    if rollout is None:
        raise NotFound(f"{endpoint} has no rollout; start one with `gateway rollout start {endpoint} VERSION`")
    return rollout


def _due(rollout: Rollout, now: float) -> bool:
    """Whether a rollout is running and its step's time is up."""
    return rollout.status == RolloutStatus.RUNNING and now - rollout.step_started_at >= rollout.step_seconds


def _weights(stable: str, version: str, share: int) -> dict[str, int]:
    return {version: 100} if share >= 100 else {stable: 100 - share, version: share}


def _on_plan(ep: EndpointState, rollout: Rollout) -> bool:
    """Whether the endpoint's traffic is what the rollout's current step set."""
    return dict(ep.weights) == _weights(rollout.baseline, rollout.version, rollout.share)
