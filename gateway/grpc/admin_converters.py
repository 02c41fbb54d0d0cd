"""pb2 <-> domain conversion for the Admin service."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.config import BatchingConfig
from gateway.control import ChangeResult, VersionInfo
from gateway.desired import DesiredState
from gateway.errors import InvalidInput
from gateway.orchestration.fleet import Member
from gateway.orchestration.incidents import Incident
from gateway.orchestration.rollout import Rollout
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.shadow.stats import LATENCY_MEASURE, ShadowReport
from gateway.state import AuditEntry, StoreStatus


def within(messages: Iterable[Any], max_bytes: int) -> list[Any]:
    """As many messages as fit in `max_bytes` (always the first), so a list RPC never exceeds the message limit."""
    kept: list[Any] = []
    size = 0
    for message in messages:
        size += message.ByteSize() + 8  # the field's tag and length
        if kept and size > max_bytes:
            break
        kept.append(message)
    return kept


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value)


def change_response(result: ChangeResult) -> pb.ChangeResponse:
    """A change (or dry run) result."""
    return pb.ChangeResponse(
        revision=result.revision,
        dry_run=result.dry_run,
        changes=[pb.Change(path=c.path, before=_json(c.before), after=_json(c.after)) for c in result.changes],
        audit_id=result.audit_id,
        message=result.message,
    )


def store_status(status: StoreStatus) -> pb.StoreStatus:
    """A process's view of its store."""
    return pb.StoreStatus(url=status.url, connected=status.connected, since=status.since, error=status.error)


def fleet_status(member: str, leader: str, members: list[Member]) -> pb.FleetStatus:
    """The live processes sharing the store and the guardian's leader."""
    return pb.FleetStatus(
        member=member,
        leader=leader,
        members=[pb.FleetMember(id=m.id, process=m.process, address=m.address, started=m.started) for m in members],
    )


def routes(revision: int, committed_at: float, state: DesiredState, endpoint: str = "") -> pb.Routes:
    """Routes of every endpoint (or one) at a revision."""
    names = [state.endpoint(endpoint).name] if endpoint else sorted(state.endpoints)
    return pb.Routes(
        revision=revision,
        committed_at=committed_at,
        endpoints=[
            pb.EndpointRoutes(
                name=name,
                versions=list(state.endpoints[name].versions),
                traffic=dict(state.endpoints[name].weights),
                labels=dict(state.endpoints[name].labels),
                max_batch_size=state.endpoints[name].max_batch_size,
                nan_policy=state.endpoints[name].nan_policy,
                shadows=dict(state.endpoints[name].shadows),
                faults={
                    v: f"error_rate={f.error_rate:g} latency_ms={f.latency_ms:g}"
                    for v, f in state.endpoints[name].faults.items()
                },
                guardrails=[r.text for r in state.endpoints[name].guardrails.rules],
                guardrails_at_least=state.endpoints[name].guardrails.at_least
                if state.endpoints[name].guardrails.rules
                else 0,
                guardrails_observe_only=state.endpoints[name].guardrails.observe_only,
                batching=_batching_message(state.endpoints[name].batching),
                runner=state.endpoints[name].runner,
            )
            for name in names
        ],
    )


def _batching_message(batching: BatchingConfig | None) -> pb.Batching | None:
    if batching is None:
        return None
    return pb.Batching(
        max_batch_size=batching.max_batch_size,
        max_delay_ms=batching.max_delay_ms,
        preferred_batch_sizes=list(batching.preferred_batch_sizes),
    )


def batching(request: pb.SetBatchingRequest) -> BatchingConfig | None:
    """The settings of a SetBatching call (None: off), validated as the route file's are."""
    given = request.HasField("batching")
    if request.off == given:
        raise InvalidInput(
            "give the batching settings (max_batch_size, max_delay_ms, optional preferred_batch_sizes), "
            "or off to turn batching off" + (", not both" if given else "")
        )
    if request.off:
        return None
    settings = request.batching
    return BatchingConfig.checked(
        "batching",
        max_batch_size=settings.max_batch_size,
        max_delay_ms=settings.max_delay_ms,
        preferred_batch_sizes=tuple(settings.preferred_batch_sizes),
    )


def versions(infos: Iterable[VersionInfo]) -> pb.ListVersionsResponse:
    """Loaded versions."""
    return pb.ListVersionsResponse(
        versions=[
            pb.VersionInfo(
                endpoint=i.endpoint,
                version=i.version,
                state=i.state,
                sha256=i.sha256,
                path=i.path,
                loaded_at=i.loaded_at,
                load_seconds=i.load_seconds,
                traffic=i.traffic,
                labels=i.labels,
                error=i.error,
            )
            for i in infos
        ]
    )


def _quantiles(values: Mapping[str, float]) -> pb.Quantiles:
    return pb.Quantiles(**{k: float(v) for k, v in values.items()})


def shadow_report(report: ShadowReport, percent: int) -> pb.ShadowReport:
    """A shadow comparison report."""
    return pb.ShadowReport(
        endpoint=report.endpoint,
        shadow_version=report.shadow_version,
        window_seconds=report.window_seconds,
        percent=percent,
        mirrored=report.mirrored,
        compared=report.compared,
        dropped=report.dropped,
        errors=report.errors,
        decisions=report.decisions,
        agree=report.agree,
        agreement_rate=report.agreement_rate,
        agreement_ci_low=report.agreement_ci[0],
        agreement_ci_high=report.agreement_ci[1],
        diff=_quantiles(report.diff_quantiles),
        primary_latency_ms=_quantiles(report.primary_latency_ms),
        shadow_latency_ms=_quantiles(report.shadow_latency_ms),
        top_divergent=[pb.DivergentRequest(request_id=r, max_abs_diff=d) for r, d in report.top_divergent],
        primary_versions=report.primary_versions,
        diff_histogram=[pb.HistogramBucket(upper=upper, count=count) for upper, count in report.diff_histogram],
        processes=report.processes,
        latency_measure=LATENCY_MEASURE,
        latency_samples=report.latency_samples,
        note=report.note,
    )


def rollout(state: Rollout, *, dry_run: bool = False) -> pb.RolloutStatus:
    """A rollout's state."""
    return pb.RolloutStatus(
        endpoint=state.endpoint,
        version=state.version,
        baseline=state.baseline,
        status="planned" if dry_run else state.status,
        steps=state.steps,
        step_index=state.step_index,
        step_seconds=state.step_seconds,
        step_started_at=state.step_started_at,
        started_at=state.started_at,
        started_by=state.started_by,
        guardrails=state.rules,
        at_least=state.at_least,
        history=[pb.RolloutEvent(at=e["at"], event=e["event"]) for e in state.history],
        dry_run=dry_run,
    )


def incident(record: Incident) -> pb.Incident:
    """An incident record with its note."""
    return pb.Incident(
        id=record.id,
        endpoint=record.endpoint,
        at=record.at,
        action=record.action,
        candidate=record.candidate,
        baseline=record.baseline,
        observe_only=record.observe_only,
        outcome=record.outcome,
        revision_before=record.revision_before,
        revision_after=record.revision_after,
        summary=record.summary(),
        markdown=record.to_markdown(),
        record=record.to_json(),
    )


def audit(entries: Iterable[AuditEntry], max_bytes: int, *, more: bool = False) -> pb.GetAuditResponse:
    """Audit entries, as many as fit in `max_bytes` (at least one); `next_before_id` set when more remain."""
    response = pb.GetAuditResponse()
    size = 0
    for e in entries:
        entry = pb.AuditEntry(
            id=e.id,
            at=e.at,
            actor=e.actor,
            action=e.action,
            endpoint=e.endpoint,
            reason=e.reason,
            dry_run=e.dry_run,
            revision_before=e.revision_before,
            revision_after=e.revision_after,
            changes=[pb.Change(path=c["path"], before=_json(c["before"]), after=_json(c["after"])) for c in e.changes],
            detail=json.dumps(e.detail),
        )
        size += entry.ByteSize() + 8  # the field's tag and length
        if response.entries and size > max_bytes:
            response.next_before_id = response.entries[-1].id
            return response
        response.entries.append(entry)
    if more and response.entries:
        response.next_before_id = response.entries[-1].id
    return response
