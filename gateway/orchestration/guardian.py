"""`Guardian`: evaluates every endpoint's guardrails each tick and acts on a breach.

Per endpoint, every version that takes weighted traffic besides `stable` is a candidate,
compared with stable over the same sliding window; shadow versions are checked against
`shadow_disagreement` and `score_drift` rules (against their primary). When at least
`at_least` rules breach, the most severe action of the breaching rules runs: `rollback`
(through the control plane: all traffic to stable, in the same tick), `pause` (holds a
running rollout), or `alert-only`. Observe-only rule sets record what would have fired.
Every breach writes an incident record. A breach is acted on once while it lasts
(observe-only and enforcing count apart), except a rollback that happened (a candidate
routed to again is judged afresh) or lost a race with another writer (tried again next
tick). The guardian also ends rollouts whose traffic an operator changed, and advances those
whose step is due and whose rules all pass. Each tick also samples the process's memory
(memory_growth), tells the drift histograms which endpoints have drift rules, and publishes
what it measured (`gateway.guardrail.observed`).

With `lead(leadership)` (every `gateway serve` process), a tick judges and acts only on the
process that leads the fleet, on the fleet's merged windows and drift histograms, its writes
fenced by the leader's lock; the breaches it holds off on are kept in the store, so a new
leader does not act on them again. Every process still samples its memory, counts its drift
histograms, and each tick agrees with the others on the bins they count on (`SharedBins`).

One window after each rollback it checks the version the traffic went to and appends the
result to the incident (`verify.py`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.control import ControlPlane
from gateway.desired import EndpointState
from gateway.errors import Conflict, FailedPrecondition, GatewayError, LockLost, StoreUnavailable
from gateway.guardrails.rules import Action, Metric, Rule, RuleSet
from gateway.guardrails.sequential import CtrExperiment, ValueExperiment
from gateway.orchestration.evaluate import Status, Verdict, combine, evaluate
from gateway.orchestration.fleet_drift import SharedBins
from gateway.orchestration.incidents import Incident, IncidentLog
from gateway.orchestration.memory import MemoryAttribution, MemoryEvidence
from gateway.orchestration.rollout import Rollout, RolloutDriver, RolloutStatus
from gateway.orchestration.verify import Verifier
from gateway.registry import ModelRegistry
from gateway.routing import STABLE
from gateway.telemetry.drift import DriftTracker, HistogramStats
from gateway.telemetry.guardrail_metrics import GuardrailGauges
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.windows import SeriesKey, WindowStats, WindowStore

log = logging.getLogger(__name__)

ACTOR = "guardian"
_SEVERITY = {Action.ROLLBACK: 3, Action.PAUSE: 2, Action.ALERT_ONLY: 1}


@dataclass(frozen=True)
class TickReport:
    """What one tick saw and did."""

    verdicts: dict[str, list[Verdict]]
    incidents: list[Incident]
    verified: list[Incident] = field(default_factory=list)


#: (endpoint, candidate, observe-only): a breach the guardian acted on.
_Breach = tuple[str, str, bool]
_DRIFT = (Metric.FEATURE_DRIFT, Metric.SCORE_DRIFT)
_Experiment = CtrExperiment | ValueExperiment
#: The store record of the breaches a leader holds off on (read by the next leader).
HOLDING_KIND, HOLDING_KEY = "guardian", "holding"


class HistogramReader(Protocol):
    """Where the drift rules read histograms: this process's, or the fleet's (the leader)."""

    def window(self, endpoint: str, version: str, seconds: int) -> HistogramStats | None:
        """A version's histograms over the last `seconds` (None when none are counted)."""
        ...

    def status(self, endpoint: str) -> str:
        """Why an endpoint has no histograms to compare yet ("" when its bins are placed)."""
        ...


class Leadership(Protocol):
    """Whether this process leads the fleet's guardian, tick by tick."""

    def term(self) -> AbstractContextManager[WindowStore | None]:
        """Inside: the fleet's merged windows with this tick's counts (and writes fenced), or None when not leading.

        A new term (a new leadership) gives a new WindowStore.
        """
        ...

    def memory(self) -> Mapping[str, MemoryWindow]:
        """The other live processes' resident memory, by process name (memory_growth watches every process)."""
        ...

    def drift(self) -> HistogramReader | None:
        """The fleet's drift histograms of this term (None: read this process's)."""
        ...


class Guardian:
    """Owns the evaluation loop; acts only through the control plane and the rollout driver."""

    def __init__(
        self,
        control: ControlPlane,
        windows: WindowStore,
        registry: ModelRegistry,
        rollouts: RolloutDriver,
        incidents: IncidentLog,
        *,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        drift: DriftTracker | None = None,
        memory: MemoryWindow | None = None,
        gauges: GuardrailGauges | None = None,
    ) -> None:
        self._control = control
        self._windows = windows
        self._registry = registry
        self._drift = drift or DriftTracker(windows.horizon, clock=clock)
        self._histograms: HistogramReader = self._drift
        self._bins = SharedBins(control.store, self._drift, clock)
        self.memory = MemoryAttribution(memory or MemoryWindow(windows.horizon, clock=clock), registry, clock)
        self._gauges = gauges
        self.rollouts = rollouts
        self.incidents = incidents
        self._clock = clock
        self.tick_seconds = tick_seconds
        self._experiments: dict[tuple[str, str, str, int], _Experiment] = {}
        self._evaluated: set[tuple[str, str, str, int]] = set()
        # Breaches acted on that were still breaching at the last tick: not acted on again until
        # they stop (see `_rollback` for when a rollback holds).
        self._holding: set[_Breach] = set()
        self._leadership: Leadership | None = None
        # One window after each rollback: is the version the traffic went to healthy?
        # The windows and histograms are the guardian's own: a leader's term swaps in the fleet's.
        self.verifier = Verifier(
            lambda: self._windows,
            incidents,
            clock,
            histograms=self._histogram_window,
            feature_names=self._features,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _histogram_window(self, endpoint: str, version: str, seconds: int) -> HistogramStats | None:
        """A version's histograms as the rules read them now (the fleet's while leading)."""
        return self._histograms.window(endpoint, version, seconds)

    def lead(self, leadership: Leadership) -> None:
        """Tick only while this process leads the fleet, on the fleet's merged windows."""
        self._leadership = leadership

    # --- evaluation ------------------------------------------------------------------------------

    def _features(self, endpoint: str, version: str) -> tuple[str, ...]:
        try:
            model = self._registry.runnable(endpoint, version)
        except GatewayError:
            return ()
        return model.feature_names

    def _experiment(self, endpoint: str, candidate: str, stable: str, rule: Rule, share: int) -> _Experiment:
        # A new experiment (the candidate's share changed) starts a new sequential test, counting
        # outcomes from now on.
        key = (endpoint, candidate, rule.text, share)
        self._evaluated.add(key)
        experiment = self._experiments.get(key)
        if experiment is None:
            kind = CtrExperiment if rule.metric is Metric.CTR_DROP else ValueExperiment
            experiment = self._experiments[key] = kind(
                self._windows.window(SeriesKey(endpoint, candidate)), self._windows.window(SeriesKey(endpoint, stable))
            )
        return experiment

    def _pair(
        self, endpoint: str, candidate: str, baseline: str, seconds: int
    ) -> tuple[HistogramStats | None, HistogramStats | None]:
        c = self._histograms.window(endpoint, candidate, seconds)
        return c, self._histograms.window(endpoint, baseline, seconds) if baseline else None

    def _evidence(self, ep: EndpointState, rule: Rule, candidate: str, stable: str) -> dict[str, object]:
        """What a rule needs beyond the windows: its running test, histograms, memory attribution."""
        if rule.metric in (Metric.CTR_DROP, Metric.VALUE_DROP) and stable:
            test = self._experiment(ep.name, candidate, stable, rule, ep.weights[candidate])
            return {"ctr_test" if rule.metric is Metric.CTR_DROP else "value_test": test}
        if rule.metric in _DRIFT:
            return {
                "histograms": self._pair(ep.name, candidate, stable, rule.window_seconds),
                "drift_note": self._histograms.status(ep.name),
            }
        if rule.metric is Metric.MEMORY_GROWTH:
            evidence: MemoryEvidence = self.memory.evidence(ep.name, candidate, rule.window_seconds)
            return {"memory": evidence}
        return {}

    def evaluate_endpoint(self, ep: EndpointState, rules: RuleSet) -> dict[str, list[Verdict]]:
        """Verdicts per candidate (canaries and shadows)."""
        stable = ep.labels.get(STABLE, "")
        out: dict[str, list[Verdict]] = {}
        cache: dict[tuple[str, int], WindowStats] = {}

        def stats(version: str, window: int) -> WindowStats:
            key = (version, window)
            if key not in cache:
                cache[key] = self._windows.window(SeriesKey(ep.name, version)).stats(window)
            return cache[key]

        canaries = [v for v, w in ep.weights.items() if w > 0 and v != stable]
        for candidate in canaries:
            verdicts = []
            feature_names = self._features(ep.name, candidate)
            for rule in rules.canary_rules:
                c = stats(candidate, rule.window_seconds)
                b = stats(stable, rule.window_seconds) if stable else None
                extra: Any = self._evidence(ep, rule, candidate, stable)
                verdicts.append(evaluate(rule, candidate, stable, c, b, feature_names=feature_names, **extra))
            out[candidate] = verdicts
        for shadow in ep.shadows if rules.shadow_rules else ():
            out.setdefault(shadow, [])
            for rule in rules.shadow_rules:
                extra = self._evidence(ep, rule, shadow, "")  # no stable: a shadow is judged against its primary
                out[shadow].append(evaluate(rule, shadow, "", stats(shadow, rule.window_seconds), None, **extra))
        return out

    def tick(self) -> TickReport:
        """Evaluate every endpoint once; act on breaches; advance due rollouts (as the leader, when leading)."""
        self._bins.sync(self._control.state)
        if self._leadership is None:
            return self._tick()
        with self._leadership.term() as windows:
            if windows is None:
                self._windows_term(None)
                self._follow()
                return TickReport({}, [])
            if windows is not self._windows:
                self._windows_term(windows)
            holding = set(self._holding)
            report = self._tick()
            if self._holding != holding:
                body = json.dumps(sorted(self._holding))
                self._control.store.put_record(HOLDING_KIND, HOLDING_KEY, body, self._clock())
            return report

    def _follow(self) -> None:
        """What a process that does not lead still does: sample its memory, count drift histograms."""
        state = self._control.state
        self.memory.observe(state)
        self._drift.track(name for name, ep in state.endpoints.items() if ep.guardrails.uses(*_DRIFT))
        if self._gauges is not None:
            self._gauges.publish({})  # the leader publishes what the guardian measured

    def _windows_term(self, windows: WindowStore | None) -> None:
        """A term begins (windows) or ends (None): start afresh, holding off on what the last leader held."""
        self._experiments = {}
        self._holding = set()
        if windows is None:
            self.memory.others = None
            self._histograms = self._drift
            return
        self._windows = windows
        self.verifier.resume()  # checks the last leader scheduled
        assert self._leadership is not None
        self.memory.others = self._leadership.memory
        self._histograms = self._leadership.drift() or self._drift
        body = self._control.store.get_record(HOLDING_KIND, HOLDING_KEY)
        if body:
            self._holding = {(str(e), str(c), bool(o)) for e, c, o in json.loads(body)}
        log.info("leading the guardian; holding off on %d breach(es) already acted on", len(self._holding))

    def _tick(self) -> TickReport:
        seen: dict[str, list[Verdict]] = {}
        incidents: list[Incident] = []
        holding: set[_Breach] = set()
        self._evaluated = set()
        state = self._control.state
        self.memory.observe(state)
        drifting: set[str] = set()
        observed: dict[tuple[str, str, str, str], Verdict] = {}
        for name, ep in state.endpoints.items():
            rollout = _active(self.rollouts.reconcile(ep, self.rollouts.get(name)))
            rules = rollout.rule_set() if rollout is not None and rollout.rules else ep.guardrails
            if rules.uses(*_DRIFT):
                drifting.add(name)
            by_candidate = self.evaluate_endpoint(ep, rules) if rules.rules else {}
            for candidate, verdicts in by_candidate.items():
                seen[f"{name}/{candidate}"] = verdicts
                observed.update({(name, candidate, v.rule.metric.value, v.rule.text): v for v in verdicts})
                key = (name, candidate, rules.observe_only)
                if not verdicts or not combine(rules, verdicts):
                    continue
                if key not in self._holding:
                    incident, hold = self._act(ep, rules, candidate, verdicts, rollout)
                    incidents.append(incident)
                    rollout = _active(self.rollouts.get(name))  # the action may have paused or ended it
                    if not hold:
                        continue
                holding.add(key)
            if rollout is not None:
                self.rollouts.advance(rollout, rules, by_candidate.get(rollout.version, []))
        self._holding = holding
        self._drift.track(drifting)  # histograms for the endpoints with drift rules, from the next request
        if self._gauges is not None:
            self._gauges.publish({key: (v.observed, v.rule.threshold) for key, v in observed.items()})
        # Experiments of pairs no longer evaluated (no traffic, rule removed, share changed) end.
        self._experiments = {k: v for k, v in self._experiments.items() if k in self._evaluated}
        verified = self.verifier.run_due(self._routes)
        return TickReport(seen, incidents, verified)

    def _routes(self, endpoint: str) -> tuple[int, dict[str, int]]:
        return self._control.revision, dict(self._control.state.endpoint(endpoint).weights)

    # --- acting ----------------------------------------------------------------------------------

    def _act(
        self, ep: EndpointState, rules: RuleSet, candidate: str, verdicts: list[Verdict], rollout: Rollout | None
    ) -> tuple[Incident, bool]:
        """Run the breach's action and record the incident; whether to hold off while it keeps breaching."""
        breaching = [v for v in verdicts if v.status is Status.BREACH]
        # The rollout as the rule found it (the action may change the very object).
        seen = (rollout.version, str(rollout.status)) if rollout is not None else None
        action = max((v.rule.action for v in breaching), key=_SEVERITY.__getitem__)
        now = self._clock()
        incident = Incident(
            id=self.incidents.new_id(ep.name, now),
            endpoint=ep.name,
            at=now,
            action=action.value,
            candidate=candidate,
            baseline=ep.labels.get(STABLE, ""),
            verdicts=[v.to_dict() for v in verdicts],
            at_least=rules.at_least,
            observe_only=rules.observe_only,
            revision_before=self._control.revision,
            traffic_before=dict(ep.weights),
        )
        rule_text = "; ".join(v.rule.text for v in breaching)
        hold = True
        touched: Rollout | None = None  # the rollout this incident changed or concerns
        if rules.observe_only:
            incident.outcome = f"observe-only: would have done {action.value}"
        elif candidate in ep.shadows and candidate not in ep.weights:
            incident.outcome = (
                f"alert: shadow {candidate}: {rule_text} (a shadow answers no caller: nothing to roll back; "
                f"`gateway admin shadow {ep.name} {candidate} --off` stops it)"
            )
        elif action is Action.ROLLBACK:
            hold, touched = self._rollback(ep, incident, rule_text)
            if incident.revision_after:
                self.verifier.schedule(incident, ep.labels[STABLE], [v.rule for v in breaching])
        elif action is Action.PAUSE:
            incident.outcome = "alert (pause requested, but no rollout is running)"
            if rollout is not None and rollout.status is RolloutStatus.RUNNING:
                try:
                    touched = self.rollouts.pause(ACTOR, ep.name, reason=f"guardrail: {rule_text}")
                    incident.outcome = f"paused the rollout of {rollout.version} at {rollout.share}%"
                except FailedPrecondition as err:  # an operator paused or ended it meanwhile
                    incident.outcome = f"alert (pause requested, but {err.message})"
        else:
            incident.outcome = "alert only"
        if touched is None and rollout is not None and rollout.version == candidate:
            touched = rollout  # the rollout of this candidate: the incident shows where it was
        if touched is not None:
            incident.rollout = {
                "version": touched.version,
                "steps": touched.steps,
                "step_index": touched.step_index,
                "status_before": seen[1] if seen is not None and seen[0] == touched.version else None,
                "status": str(touched.status),
            }
        self.incidents.save(incident)
        log.warning("incident %s: %s (%s)", incident.id, incident.summary(), incident.outcome)
        return incident, hold

    def _rollback(self, ep: EndpointState, incident: Incident, rule_text: str) -> tuple[bool, Rollout | None]:
        """Roll back to stable: whether to hold off while the breach lasts, and the rollout it failed.

        A rollback that happened holds nothing (whoever routes to the candidate again gets a
        fresh decision); one that lost a race with another writer is tried again next tick;
        one that cannot happen (no stable label, stable not ready) is reported once.
        """
        if STABLE not in ep.labels:
            incident.outcome = "rollback impossible: the endpoint has no stable label"
            return True, None
        try:
            result = self._control.rollback(ACTOR, ep.name, reason=f"guardrail: {rule_text}", trigger="guardrail")
        except LockLost:
            raise  # another process leads now: it decides, and this one writes nothing
        except Conflict as err:
            incident.outcome = f"rollback failed, retrying next tick: {err.message}"
            return False, None
        except GatewayError as err:
            incident.outcome = f"rollback failed: {err.message}"
            return True, None
        incident.revision_after = result.revision
        incident.traffic_after = dict(self._control.state.endpoint(ep.name).weights)
        # The endpoint's CTR experiments end with the rollback: a canary routed again, even before
        # the next tick, is judged on new evidence, not on the evidence that rolled it back.
        self._experiments = {k: v for k, v in self._experiments.items() if k[0] != ep.name}
        self._evaluated = {k for k in self._evaluated if k[0] != ep.name}
        incident.outcome = f"rolled back to {ep.labels[STABLE]}"
        failed = self.rollouts.failed(ep.name, f"failed: guardrail {rule_text} (incident {incident.id})")
        if failed is not None:
            incident.outcome += f"; rollout of {failed.version} marked failed"
        return False, failed

    # --- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        """Tick every `tick_seconds` in a background thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="guardian", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lost = ""
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
                lost = ""
            except LockLost as err:  # another process took the lead mid-tick; nothing was written
                log.warning("guardian tick abandoned: %s", err.message)
            except StoreUnavailable as err:  # fail static: it acts again once the store is back
                if err.message != lost:
                    log.warning("guardian paused: %s", err.message)
                lost = err.message
            except Exception:  # a failed tick must not stop the guardian
                log.exception("guardian tick failed")

    def stop(self) -> None:
        """Stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def _active(rollout: Rollout | None) -> Rollout | None:
    return rollout if rollout is not None and rollout.active else None
