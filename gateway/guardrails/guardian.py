"""`Guardian`: evaluates every endpoint's guardrails each tick and acts on a breach.

Per endpoint, every version that takes weighted traffic besides `stable` is a candidate,
compared with stable over the same sliding window; shadow versions are checked against
`shadow_disagreement` rules. When at least `at_least` rules breach, the most severe action of
the breaching rules runs: `rollback` (through the control plane: all traffic to stable, in
the same tick), `pause` (holds a running rollout), or `alert-only`. Observe-only rule sets
record what would have fired. Every breach writes an incident record. The guardian also
advances rollouts whose step is due and whose rules all pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.control import ControlPlane
from gateway.desired import EndpointState
from gateway.errors import GatewayError
from gateway.guardrails.evaluate import Status, Verdict, combine, evaluate
from gateway.guardrails.incidents import Incident, IncidentLog
from gateway.guardrails.rollout import RolloutDriver
from gateway.guardrails.rules import Action, Metric, RuleSet
from gateway.guardrails.sequential import SequentialDropTest
from gateway.registry import ModelRegistry
from gateway.routing import STABLE
from gateway.telemetry.windows import SeriesKey, WindowStats, WindowStore

log = logging.getLogger(__name__)

ACTOR = "guardian"
_SEVERITY = {Action.ROLLBACK: 3, Action.PAUSE: 2, Action.ALERT_ONLY: 1}


@dataclass(frozen=True)
class TickReport:
    """What one tick saw and did."""

    verdicts: dict[str, list[Verdict]]
    incidents: list[Incident]
    seconds: float


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
    ) -> None:
        self._control = control
        self._windows = windows
        self._registry = registry
        self.rollouts = rollouts
        self.incidents = incidents
        self._clock = clock
        self.tick_seconds = tick_seconds
        self._tests: dict[tuple[str, str, str, int], SequentialDropTest] = {}
        self._firing: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- evaluation ------------------------------------------------------------------------------

    def _features(self, endpoint: str, version: str) -> tuple[str, ...]:
        try:
            model = self._registry.runnable(endpoint, version)
        except GatewayError:
            return ()
        return model.feature_names

    def _test(self, endpoint: str, candidate: str, rule: str, share: int) -> SequentialDropTest:
        # A new experiment (the candidate's share changed) starts a new sequential test.
        key = (endpoint, candidate, rule, share)
        test = self._tests.get(key)
        if test is None:
            test = self._tests[key] = SequentialDropTest()
        return test

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
            for rule in rules.rules:
                if rule.metric is Metric.SHADOW_DISAGREEMENT:
                    continue
                c = stats(candidate, rule.window_seconds)
                b = stats(stable, rule.window_seconds) if stable else None
                test = self._test(ep.name, candidate, rule.text, ep.weights[candidate])
                feature_names = self._features(ep.name, candidate)
                verdicts.append(evaluate(rule, candidate, stable, c, b, feature_names=feature_names, ctr_test=test))
            out[candidate] = verdicts
        shadow_rules = [r for r in rules.rules if r.metric is Metric.SHADOW_DISAGREEMENT]
        for shadow in ep.shadows if shadow_rules else ():
            out.setdefault(shadow, [])
            for rule in shadow_rules:
                out[shadow].append(evaluate(rule, shadow, "", stats(shadow, rule.window_seconds), None))
        return out

    def tick(self) -> TickReport:
        """Evaluate every endpoint once; act on breaches; advance due rollouts."""
        started = time.perf_counter()
        seen: dict[str, list[Verdict]] = {}
        incidents: list[Incident] = []
        for name, ep in self._control.state.endpoints.items():
            rules = self.rollouts.rules_for(name) or ep.guardrails
            if not rules.rules:
                continue
            by_candidate = self.evaluate_endpoint(ep, rules)
            for candidate, verdicts in by_candidate.items():
                seen[f"{name}/{candidate}"] = verdicts
                key = (name, candidate)
                if verdicts and combine(rules, verdicts):
                    if key not in self._firing:
                        self._firing.add(key)
                        incidents.append(self._act(ep, rules, candidate, verdicts))
                else:
                    self._firing.discard(key)
            rollout = self.rollouts.get(name)
            if rollout is not None and rollout.status == "running":
                self.rollouts.advance(name, by_candidate.get(rollout.version, []))
        return TickReport(seen, incidents, time.perf_counter() - started)

    # --- acting ----------------------------------------------------------------------------------

    def _act(self, ep: EndpointState, rules: RuleSet, candidate: str, verdicts: list[Verdict]) -> Incident:
        breaching = [v for v in verdicts if v.status is Status.BREACH]
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
            observe_only=rules.dry_run,
            revision_before=self._control.revision,
            traffic_before=dict(ep.weights),
        )
        rule_text = "; ".join(v.rule.text for v in breaching)
        if rules.dry_run:
            incident.outcome = f"observe-only: would have done {action.value}"
        elif candidate in ep.shadows and candidate not in ep.weights:
            incident.outcome = f"alert: shadow {candidate} disagrees with the primary ({rule_text})"
        elif action is Action.ROLLBACK:
            self._rollback(ep, incident, rule_text)
        elif action is Action.PAUSE:
            rollout = self.rollouts.get(ep.name)
            if rollout is not None and rollout.status == "running":
                self.rollouts.pause(ACTOR, ep.name, reason=f"guardrail: {rule_text}")
                incident.outcome = f"paused the rollout of {rollout.version} at {rollout.share}%"
            else:
                incident.outcome = "alert (pause requested, but no rollout is running)"
        else:
            incident.outcome = "alert only"
        rollout = self.rollouts.get(ep.name)
        if rollout is not None:
            incident.rollout = {
                "version": rollout.version,
                "steps": rollout.steps,
                "step_index": rollout.step_index,
                "status": rollout.status,
            }
        self.incidents.save(incident)
        log.warning("incident %s: %s (%s)", incident.id, incident.summary(), incident.outcome)
        return incident

    def _rollback(self, ep: EndpointState, incident: Incident, rule_text: str) -> None:
        if STABLE not in ep.labels:
            incident.outcome = "rollback impossible: the endpoint has no stable label"
            return
        try:
            result = self._control.rollback(ACTOR, ep.name, reason=f"guardrail: {rule_text}", trigger="guardrail")
        except GatewayError as err:
            incident.outcome = f"rollback failed: {err.message}"
            return
        incident.revision_after = result.revision
        incident.traffic_after = dict(self._control.state.endpoint(ep.name).weights)
        incident.outcome = f"rolled back to {ep.labels[STABLE]}"
        failed = self.rollouts.failed(ep.name, f"failed: guardrail {rule_text} (incident {incident.id})")
        if failed is not None:
            incident.outcome += f"; rollout of {failed.version} marked failed"

    # --- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        """Tick every `tick_seconds` in a background thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="guardian", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:  # a failed tick must not stop the guardian
                log.exception("guardian tick failed")

    def stop(self) -> None:
        """Stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
