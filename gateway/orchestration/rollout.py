"""Progressive rollouts: a version ramps 5% -> 25% -> 50% -> 100% while its guardrails pass.

A step advances when its duration has passed and every rule passed with enough samples
(inconclusive holds the step). Reaching 100% promotes the version to stable in one revision. A breach rolls back
and marks the rollout failed (the guardian does that). A change of the endpoint's traffic from
outside the rollout (an operator's rollback, switch, set-traffic, promote or apply) ends it, so
the driver never fights the operator: `aborted`, or `completed` when the version became stable.
The state is a record in the store, so a restarted gateway resumes where it was.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.control import ControlPlane, Intent
from gateway.desired import EndpointState
from gateway.errors import FailedPrecondition, InvalidInput, NotFound
from gateway.guardrails.rules import RuleSet
from gateway.limits import MAX_REASON_CHARS, MAX_STEPS, check_count, check_rules
from gateway.orchestration.evaluate import Status, Verdict
from gateway.routing import CANARY, STABLE, format_traffic

KIND = "rollout"
DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_STEP_SECONDS = 600.0
MAX_STEP_SECONDS = 30 * 86400.0
ACTOR = "rollout"


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
        body = self._store.get_record(KIND, endpoint)
        return Rollout(**json.loads(body)) if body else None

    def require(self, endpoint: str) -> Rollout:
        """The endpoint's latest rollout, or NotFound."""
        rollout = self.get(endpoint)
        if rollout is None:
            raise NotFound(f"{endpoint} has no rollout; start one with `gateway rollout start {endpoint} VERSION`")
        return rollout

    def _save(self, rollout: Rollout) -> None:
        self._store.put_record(KIND, rollout.endpoint, json.dumps(asdict(rollout)), self._clock())

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
        with self._lock:
            existing = self.get(endpoint)
            if existing and existing.active:
                raise FailedPrecondition(
                    f"{endpoint} already has a {existing.status} rollout of {existing.version}; abort it first"
                )
            now = self._clock()
            rollout = Rollout(
                endpoint, version, stable, steps, step_seconds, [r.text for r in rule_set.rules], rule_set.at_least,
                step_started_at=now, started_at=now, started_by=actor, reason=reason,
            )  # fmt: skip
            self._control.set_traffic(
                actor,
                endpoint,
                _weights(stable, version, steps[0]),
                labels={CANARY: version},
                reason=_within(f"rollout of {version} step 1/{len(steps)} ({steps[0]}%): ", reason),
                dry_run=dry_run,
                trigger="rollout",
            )
            if dry_run:
                return rollout
            rollout.event(now, f"started at {steps[0]}% by {actor}: {reason}")
            self._save(rollout)
            return rollout

    def pause(self, actor: str, endpoint: str, *, reason: str) -> Rollout:
        """Hold the current step (traffic stays as it is)."""
        with self._lock:
            rollout = self.require(endpoint)
            if rollout.status != RolloutStatus.RUNNING:
                raise FailedPrecondition(f"the rollout of {rollout.version} is {rollout.status}, not running")
            self._control.note(Intent(actor, "rollout-pause", endpoint, reason))
            rollout.status = RolloutStatus.PAUSED
            rollout.event(self._clock(), f"paused by {actor}: {reason}")
            self._save(rollout)
            return rollout

    def resume(self, actor: str, endpoint: str, *, reason: str) -> Rollout:
        """Continue a paused rollout; the step's clock restarts."""
        with self._lock:
            rollout = self.require(endpoint)
            if rollout.status != RolloutStatus.PAUSED:
                raise FailedPrecondition(f"the rollout of {rollout.version} is {rollout.status}, not paused")
            self._control.note(Intent(actor, "rollout-resume", endpoint, reason))
            rollout.status = RolloutStatus.RUNNING
            rollout.step_started_at = self._clock()
            rollout.event(rollout.step_started_at, f"resumed by {actor}: {reason}")
            self._save(rollout)
            return rollout

    def abort(self, actor: str, endpoint: str, *, reason: str) -> Rollout:
        """Stop the rollout and send all traffic back to the baseline."""
        with self._lock:
            rollout = self.require(endpoint)
            if not rollout.active:
                raise FailedPrecondition(f"the rollout of {rollout.version} is already {rollout.status}")
            self._control.rollback(
                actor,
                endpoint,
                reason=_within("rollout aborted: ", reason),
                to_version=rollout.baseline,
                trigger="rollout",
            )
            rollout.status = RolloutStatus.ABORTED
            rollout.event(self._clock(), f"aborted by {actor}: {reason}")
            self._save(rollout)
            return rollout

    # --- the guardian's side -------------------------------------------------------------------

    def failed(self, endpoint: str, why: str) -> Rollout | None:
        """Mark an active rollout failed (after a guardrail rolled it back)."""
        with self._lock:
            rollout = self.get(endpoint)
            if rollout is None or not rollout.active:
                return None
            rollout.status = RolloutStatus.FAILED
            rollout.event(self._clock(), why)
            self._save(rollout)
            return rollout

    def reconcile(self, ep: EndpointState, rollout: Rollout | None) -> Rollout | None:
        """End an active rollout whose traffic was changed from outside it; the rollout as it now is.

        `rollout` is the record as the caller read it; it is read again before it is changed.
        """
        if rollout is None or not rollout.active or _on_plan(ep, rollout):
            return rollout
        with self._lock:
            rollout = self.get(ep.name)
            current = self._control.state.endpoints.get(ep.name)
            if rollout is None or not rollout.active or current is None or _on_plan(current, rollout):
                return rollout
            promoted = current.labels.get(STABLE) == rollout.version
            rollout.status = RolloutStatus.COMPLETED if promoted else RolloutStatus.ABORTED
            why = f"traffic changed outside the rollout (now {format_traffic(current.weights)})"
            self._control.note(Intent(ACTOR, "rollout-end", ep.name, f"rollout of {rollout.version} ended: {why}"))
            rollout.event(self._clock(), f"ended ({rollout.status}): {why}")
            self._save(rollout)
            return rollout

    def advance(self, rollout: Rollout, rules: RuleSet, verdicts: Sequence[Verdict]) -> Rollout | None:
        """Move to the next step when the step's time is up and every rule that gates it passed.

        `rules` are the rules the guardian evaluated for the rollout; those for a canary gate the
        step (observe-only rules never do). `rollout` is the record as the caller read it.
        """
        now = self._clock()
        if rollout.status != RolloutStatus.RUNNING or now - rollout.step_started_at < rollout.step_seconds:
            return None
        gates = () if rules.observe_only else rules.canary_rules
        mine = [v for v in verdicts if v.candidate == rollout.version]
        if gates and (len(mine) < len(gates) or any(v.status is not Status.PASS for v in mine)):
            return None  # breaching or inconclusive: hold the step
        with self._lock:
            current = self.get(rollout.endpoint)
            if current is None or (current.status, current.step_index) != (RolloutStatus.RUNNING, rollout.step_index):
                return None  # changed since the caller read it
            ep = self._control.state.endpoints.get(rollout.endpoint)
            if ep is None or not _on_plan(ep, current):
                return None  # an operator changed the traffic: `reconcile` ends the rollout
            return self._next_step(current, now)

    def _next_step(self, rollout: Rollout, now: float) -> Rollout:
        endpoint = rollout.endpoint
        next_share = rollout.steps[rollout.step_index + 1] if rollout.step_index + 1 < len(rollout.steps) else 100
        if next_share < 100:
            rollout.step_index += 1
            self._control.set_traffic(
                ACTOR,
                endpoint,
                _weights(rollout.baseline, rollout.version, next_share),
                reason=f"rollout of {rollout.version}: step {rollout.step_index + 1} ({next_share}%)",
                trigger="rollout",
            )
            rollout.step_started_at = now
            rollout.event(now, f"advanced to {next_share}%")
        else:
            # The last step is 100%: the version becomes stable in the same revision. (At 100% there
            # is no baseline traffic left to compare with, so the rules were checked one step before.)
            rollout.step_index = len(rollout.steps) - 1
            self._control.promote(ACTOR, endpoint, reason=f"rollout of {rollout.version} completed", trigger="rollout")
            rollout.status = RolloutStatus.COMPLETED
            rollout.event(now, f"promoted {rollout.version} to stable at 100%")
        self._save(rollout)
        return rollout


def _within(prefix: str, reason: str) -> str:
    """`prefix + reason`, the reason cut so the whole stays within the audit log's limit."""
    return prefix + reason[: max(0, MAX_REASON_CHARS - len(prefix))]


def _weights(stable: str, version: str, share: int) -> dict[str, int]:
    return {version: 100} if share >= 100 else {stable: 100 - share, version: share}


def _on_plan(ep: EndpointState, rollout: Rollout) -> bool:
    """Whether the endpoint's traffic is what the rollout's current step set."""
    return dict(ep.weights) == _weights(rollout.baseline, rollout.version, rollout.share)
