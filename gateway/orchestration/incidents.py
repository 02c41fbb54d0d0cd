"""Incident records: what fired, on what evidence, what changed, and a note ready to paste."""

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
            "| rule | observed | threshold | window | samples | p-value | status |",
            "|---|---:|---:|---:|---|---:|---|",
        ]
        for v in self.verdicts:
            samples = ", ".join(f"{arm} {n}" for arm, n in v["samples"].items())
            observed = "-" if v["observed"] is None else f"{v['observed']:.4g}"
            p_value = "" if v.get("p_value") is None else f"{v['p_value']:.3g}"
            lines.append(
                f"| `{v['rule']}` | {observed} | {v['threshold']:.4g} | {v['window_seconds']} s | {samples} | "
                f"{p_value} | {v['status']} |"
            )
            extra = {k: val for k, val in (v.get("values") or {}).items() if val is not None}
            if extra or v.get("detail"):
                details = ", ".join(f"{k} {val:.4g}" for k, val in extra.items())
                lines.append(f"|  | {details} {v.get('detail') or ''} | | | | | |")
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
            lines.append(
                f"Rollout of {self.rollout.get('version')} was at step {self.rollout.get('step_index', 0) + 1} "
                f"of {self.rollout.get('steps')}; it is now {self.rollout.get('status')}."
            )
        lines += [
            "",
            "## Verification",
            "",
            f"- [ ] `gateway admin routes {self.endpoint}` shows the traffic above",
            f"- [ ] error rate, latency and CTR of {self.baseline or 'stable'} back to baseline for one SLO window",
            "",
            "## Follow-ups",
            "",
            f"- [ ] root cause for {self.candidate} (`gateway report shadow {self.endpoint}`, the diff log, traces)",
            f"- [ ] fix and roll forward as a new version: `gateway rollout start {self.endpoint} NEW_VERSION`",
            "- [ ] review the guardrail thresholds if this was a false alarm",
        ]
        return "\n".join(lines) + "\n"


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
