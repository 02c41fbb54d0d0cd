"""Incident records: what fired, on what evidence, what changed, and a note ready to paste.

A note states only what happened: what the rules saw, what the guardian did and changed, the
rollout as it was then, and, one window after a rollback, whether the version that took the
traffic was healthy (`gateway/orchestration/verify.py`). To-dos are under "Follow-ups".
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.errors import NotFound
from gateway.routing import format_traffic
from gateway.state import StateStore

KIND = "incident"


@dataclass
class Incident:
    """One guardrail breach and what the guardian did about it."""

    id: str
    endpoint: str
    at: float
    action: str
    candidate: str
    baseline: str
    verdicts: list[dict[str, Any]]
    at_least: int
    observe_only: bool = False
    outcome: str = ""
    revision_before: int = 0
    revision_after: int = 0
    rollout: dict[str, Any] | None = None
    traffic_before: dict[str, int] = field(default_factory=dict)
    traffic_after: dict[str, int] = field(default_factory=dict)
    #: The check one window after a rollback: pending, then its verdicts and the routes then.
    verification: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Stored form."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Incident:
        """Inverse of to_json."""
        return cls(**json.loads(text))

    @property
    def breached(self) -> list[dict[str, Any]]:
        """The verdicts that breached."""
        return [v for v in self.verdicts if v["status"] == "breach"]

    def summary(self) -> str:
        """One line: what fired and what was done."""
        rules = "; ".join(v["rule"] for v in self.breached)
        mode = "observe-only: would have" if self.observe_only else "guardian"
        return f"{self.endpoint} {self.candidate}: {rules} -> {mode} {self.action}"

    def to_markdown(self) -> str:
        """An incident note: detect, decide, action, verification, follow-ups."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        lines = [
            f"# Incident {self.id}: {self.endpoint} {self.candidate} {self.action}",
            "",
            f"- When: {when}",
            f"- Endpoint: {self.endpoint}; candidate {self.candidate}, baseline {self.baseline or '(none)'}",
            f"- Mode: {'observe-only (nothing was changed)' if self.observe_only else 'automatic'}",
            "",
            "## Detect",
            "",
        ]
        lines += _verdict_rows(self.verdicts)
        lines += [
            "",
            "## Decide",
            "",
            f"{len(self.breached)} rule(s) breached; the policy acts when at least {self.at_least} do. "
            f"Action: **{self.action}**.",
            "",
            "## Action",
            "",
        ]
        if self.observe_only:
            lines.append("None (observe-only rules record what would have fired).")
        else:
            lines.append(f"{self.outcome or self.action}.")
            if self.revision_after:
                lines.append(
                    f"Route revision {self.revision_before} -> {self.revision_after}; traffic "
                    f"{format_traffic(self.traffic_before)} -> {format_traffic(self.traffic_after)}."
                )
        if self.rollout:
            lines.append(_rollout_line(self.rollout))
        lines += ["", "## Verification", "", *self._verification_lines(), "", "## Follow-ups"]
        lines += [
            "",
            f"- [ ] root cause for {self.candidate} (`gateway report shadow {self.endpoint}`, the diff log, traces)",
            f"- [ ] fix and roll forward as a new version: `gateway rollout start {self.endpoint} NEW_VERSION`",
            "- [ ] review the guardrail thresholds if this was a false alarm",
        ]
        return "\n".join(lines) + "\n"

    def _verification_lines(self) -> list[str]:
        """What the check one window after the action found (or why there is none)."""
        check = self.verification
        if check is None:
            if self.observe_only or not self.revision_after:
                return ["Nothing was changed, so there is nothing to verify."]
            return ["No verification was scheduled (an incident recorded before checks existed)."]
        version, window = check["version"], check["window_seconds"]
        if check["status"] == "pending":
            due = time.strftime("%H:%M:%S UTC", time.gmtime(check["due_at"]))
            return [
                f"Pending: at {due}, one window ({window} s) after the rollback, the guardian re-reads "
                f"the rules that fired for {version}."
            ]
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(check["at"]))
        verdict = {"healthy": "healthy", "unhealthy": "NOT healthy", "inconclusive": "inconclusive"}[check["status"]]
        lines = [
            f"At {at}, one window ({window} s) after the rollback, {version} was **{verdict}** on the rules "
            "that fired (rules that compare two arms compare it with itself when the rule fired):",
            "",
            *_verdict_rows(check["verdicts"]),
            "",
            f"Routes then: revision {check['revision']}; traffic {format_traffic(check['traffic'])}.",
        ]
        return lines


def _verdict_rows(verdicts: list[dict[str, Any]]) -> list[str]:
    """The verdicts as a markdown table: rule, observed, threshold, window, samples, p-value, status."""
    lines = [
        "| rule | observed | threshold | window | samples | p-value | status |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for v in verdicts:
        samples = ", ".join(f"{arm} {n}" for arm, n in v["samples"].items()) or "-"
        observed = "-" if v["observed"] is None else f"{v['observed']:.4g}"
        p_value = "-" if v.get("p_value") is None else f"{v['p_value']:.3g}"
        lines.append(
            f"| `{v['rule']}` | {observed} | {v['threshold']:.4g} | {v['window_seconds']} s | {samples} | "
            f"{p_value} | {v['status']} |"
        )
        extra = {k: val for k, val in (v.get("values") or {}).items() if val is not None}
        if extra or v.get("detail"):
            details = ", ".join(f"{k} {val:.4g}" for k, val in extra.items())
            lines.append(f"|  | {details} {v.get('detail') or ''} | | | | | |")
    return lines


def _rollout_line(rollout: dict[str, Any]) -> str:
    """The rollout this incident concerns, as it was when the rule fired and what the guardian did to it."""
    step = f"step {rollout.get('step_index', 0) + 1} of {rollout.get('steps')}"
    after = rollout.get("status")
    before = rollout.get("status_before")
    if before is None:  # recorded before the status at detection was kept
        return f"The rollout of {rollout.get('version')} was at {step}; the guardian left it {after}."
    if before == after:
        return f"The rollout of {rollout.get('version')} was {before} at {step}; the guardian did not change it."
    return f"The rollout of {rollout.get('version')} was {before} at {step}; the guardian marked it {after}."


class IncidentLog:
    """Incidents in the store (so they survive restarts and, with etcd, are shared)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def new_id(self, endpoint: str, at: float) -> str:
        """A sortable, readable id, unique across restarts and replicas (a random suffix)."""
        return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(at))}-{endpoint}-{secrets.token_hex(3)}"

    def save(self, incident: Incident) -> None:
        """Store (or update) an incident."""
        self._store.put_record(KIND, incident.id, incident.to_json(), incident.at)

    def list(self, endpoint: str = "", limit: int = 50) -> list[Incident]:
        """Newest first (of one endpoint, when given)."""
        fetch = limit * 4 if endpoint else limit
        while True:
            rows = self._store.list_records(KIND, fetch)
            incidents = [Incident.from_json(body) for _, _, body in rows]
            found = [i for i in incidents if not endpoint or i.endpoint == endpoint]
            if len(found) >= limit or len(rows) < fetch:
                return found[:limit]
            fetch *= 4  # the store filters by kind only: read further back

    def get(self, incident_id: str) -> Incident:
        """One incident, or NotFound."""
        body = self._store.get_record(KIND, incident_id)
        if body is None:
            raise NotFound(f"no incident {incident_id!r}; `gateway incidents` lists them")
        return Incident.from_json(body)
