"""The check one window after a guardian rollback: is the version that took the traffic healthy.

The playbook's last step is "Verify: watch metrics for at least one window". When the guardian
rolls back, it schedules a check one window later (the longest window of the rules that fired)
and then re-reads the same rules for the version the traffic went to:

- a rule judged on one version alone (an error rate, a p95 in ms) is evaluated as written, on
  that version's window since the rollback;
- a rule that compares two arms compares that version's window since the rollback with its own
  window when the rule fired (a snapshot taken then): "is stable back to what it was?".

The drift rules compare the version's histograms the same way (now against when the rule
fired). The result, with every verdict and the routes at that moment, is appended to the
incident. The snapshot lives in memory: after a restart the comparing rules come out
inconclusive and say why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.guardrails.rules import Rule, parse_rule
from gateway.orchestration.evaluate import Status, Verdict, evaluate, needs_baseline
from gateway.orchestration.incidents import Incident, IncidentLog
from gateway.telemetry.drift import HistogramStats
from gateway.telemetry.windows import SeriesKey, WindowStats, WindowStore

log = logging.getLogger(__name__)

PENDING = "pending"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
INCONCLUSIVE = "inconclusive"
#: How far back the store is read for checks left pending by an earlier process.
_RESUME_LIMIT = 200

#: An endpoint's routes as the check reports them: (revision, weights).
Routes = Callable[[str], tuple[int, Mapping[str, int]]]
#: A version's drift histograms over a window: (endpoint, version, seconds) -> histograms.
Histograms = Callable[[str, str, int], HistogramStats | None]


@dataclass
class _Check:
    incident_id: str
    endpoint: str
    version: str
    due: float
    rules: tuple[Rule, ...]
    before: dict[int, tuple[WindowStats, HistogramStats | None]] | None  # when the rule fired, by window


class Verifier:
    """Owns the checks scheduled after rollbacks, runs them when due, and records their results."""

    def __init__(
        self,
        windows: Callable[[], WindowStore],
        incidents: IncidentLog,
        clock: Callable[[], float],
        *,
        histograms: Histograms | None = None,
        feature_names: Callable[[str, str], Sequence[str]] | None = None,
    ) -> None:
        self._windows = windows
        self._incidents = incidents
        self._clock = clock
        self._histograms = histograms
        self._feature_names = feature_names
        self._checks: dict[str, _Check] = {}
        self._resumed = False

    def schedule(self, incident: Incident, version: str, rules: Sequence[Rule]) -> None:
        """After `incident` sent traffic to `version`: check `rules` on it one window from now.

        Sets `incident.verification` (the caller saves the incident).
        """
        window = max((r.window_seconds for r in rules), default=0)
        before = {r.window_seconds: self._read(incident.endpoint, version, r.window_seconds) for r in rules}
        due = incident.at + window
        self._checks[incident.id] = _Check(incident.id, incident.endpoint, version, due, tuple(rules), before)
        incident.verification = {
            "status": PENDING,
            "version": version,
            "window_seconds": window,
            "due_at": due,
            "rules": [r.text for r in rules],
        }

    def run_due(self, routes: Routes) -> list[Incident]:
        """Run every check that is due; returns the incidents they completed."""
        if not self._resumed:
            self._resume()
        now = self._clock()
        done = []
        for check in [c for c in self._checks.values() if c.due <= now]:
            del self._checks[check.incident_id]
            try:
                incident = self._incidents.get(check.incident_id)
            except Exception:  # the record is gone (or the store is down): nothing to append to
                log.warning("verification of incident %s skipped: its record cannot be read", check.incident_id)
                continue
            verdicts = [self._verdict(check, rule) for rule in check.rules]
            revision, weights = routes(check.endpoint)
            incident.verification = {
                **(incident.verification or {}),
                "status": _status(verdicts),
                "at": now,
                "verdicts": [v.to_dict() for v in verdicts],
                "revision": revision,
                "traffic": dict(weights),
            }
            self._incidents.save(incident)
            level = logging.WARNING if incident.verification["status"] != HEALTHY else logging.INFO
            log.log(level, "incident %s verification: %s is %s", incident.id, check.version, _status(verdicts))
            done.append(incident)
        return done

    def _read(self, endpoint: str, version: str, seconds: int) -> tuple[WindowStats, HistogramStats | None]:
        stats = self._windows().window(SeriesKey(endpoint, version)).stats(seconds)
        return stats, self._histograms(endpoint, version, seconds) if self._histograms is not None else None

    def _verdict(self, check: _Check, rule: Rule) -> Verdict:
        now, now_histograms = self._read(check.endpoint, check.version, rule.window_seconds)
        evidence: dict[str, Any] = {}
        if self._feature_names is not None:
            evidence["feature_names"] = self._feature_names(check.endpoint, check.version)
        baseline = f"{check.version} when the rule fired"
        if not needs_baseline(rule):
            return evaluate(rule, check.version, "", now, None, **evidence)
        if check.before is None:
            detail = "the gateway restarted within the window: the snapshot taken when the rule fired is gone"
            return Verdict(rule, check.version, baseline, Status.INCONCLUSIVE, math.nan, {}, detail=detail)
        before, before_histograms = check.before[rule.window_seconds]
        evidence["histograms"] = (now_histograms, before_histograms)
        return evaluate(rule, check.version, baseline, now, before, **evidence)

    def resume(self) -> None:
        """Read the store again for checks another process scheduled (this one has just begun to lead)."""
        self._resumed = False

    def _resume(self) -> None:
        """Pick up checks an earlier process scheduled and did not finish (without their snapshots)."""
        self._resumed = True
        for incident in self._incidents.list(limit=_RESUME_LIMIT):
            pending = incident.verification or {}
            if pending.get("status") != PENDING or incident.id in self._checks:
                continue
            rules = tuple(parse_rule(text) for text in pending.get("rules", []))
            self._checks[incident.id] = _Check(
                incident.id, incident.endpoint, pending["version"], float(pending["due_at"]), rules, None
            )

    @property
    def pending(self) -> int:
        """Checks scheduled and not yet run."""
        return len(self._checks)


def _status(verdicts: Sequence[Verdict]) -> str:
    if any(v.status is Status.BREACH for v in verdicts):
        return UNHEALTHY
    if verdicts and all(v.status is Status.PASS for v in verdicts):
        return HEALTHY
    return INCONCLUSIVE
