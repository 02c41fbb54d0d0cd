"""`gateway.v1.Admin`: authenticated (by the guard), converts, calls the control plane.

The admin listener is a thread-pool gRPC server, apart from the inference event loop: store
I/O (fsync) and model loading block only an admin worker thread, never the loop that serves
predictions, and no call pays an executor hand-off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import grpc

from gateway.control import ChangeResult, ControlPlane
from gateway.desired import DesiredState
from gateway.faults import Fault
from gateway.grpc import admin_converters as convert
from gateway.grpc.errors import ACTOR
from gateway.limits import MAX_PAGE, MAX_REASON_CHARS, check_text
from gateway.orchestration.fleet import PROCESS, Fleet
from gateway.orchestration.incidents import IncidentLog
from gateway.orchestration.rollout import RolloutDriver
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc
from gateway.shadow.runner import ShadowRunner
from gateway.shadow.stats import ShadowSummary

Context: TypeAlias = grpc.ServicerContext
__all__ = ["PROCESS", "AdminServicer", "ShadowPeers"]


class ShadowPeers(Protocol):
    """The other live processes of the fleet, asked for their shadow summaries."""

    def shadow_summaries(self, endpoint: str, version: str, window: int, top: int) -> list[ShadowSummary]:
        """Every other live process's summary of a shadow over a window."""
        ...

    def shadows_seen(self, endpoint: str) -> set[str]:
        """The endpoint's shadow versions any other live process has mirrored to."""
        ...


def _reason(request: Any) -> str:
    """A caller's reason, within the audit log's limit (the guardian's and rollouts' own are not checked)."""
    return check_text(request.reason, "reason", MAX_REASON_CHARS)


#: Most bytes of entries in one page of a list RPC (a fourth of the default message limit): newest first,
#: so a long history never makes ListRevisions, ListIncidents or GetAudit fail for its size.
PAGE_BYTES = AUDIT_PAGE_BYTES = 1 << 20


def _page(limit: int, default: int) -> int:
    return min(limit or default, MAX_PAGE)


class AdminServicer(pb_grpc.AdminServicer):
    """Admin RPCs, run in the admin server's worker threads."""

    def __init__(
        self,
        control: ControlPlane,
        shadow: ShadowRunner,
        rollouts: RolloutDriver,
        incidents: IncidentLog,
        *,
        fleet: Fleet | None = None,
        peers: ShadowPeers | None = None,
    ) -> None:
        self._control = control
        self._shadow = shadow
        self._rollouts = rollouts
        self._incidents = incidents
        self._fleet = fleet
        self._peers = peers

    @staticmethod
    def _change(method: Callable[..., ChangeResult], request: Any, *args: Any, **kwargs: Any) -> pb.ChangeResponse:
        """A mutating RPC: the authenticated caller, the request's reason and dry_run, the result converted."""
        result = method(ACTOR.get(), *args, reason=_reason(request), dry_run=request.dry_run, **kwargs)
        return convert.change_response(result)

    def GetRoutes(self, request: pb.GetRoutesRequest, context: Context) -> pb.Routes:
        if not request.revision:
            self._control.refresh()
        revision, at, state = self._control.routes_at(request.revision)
        routes = convert.routes(revision, at, state, request.endpoint)
        if revision == self._control.revision:
            routes.store.CopyFrom(convert.store_status(self._control.health.status))
            routes.process = PROCESS
            if self._fleet is not None and self._fleet.me is not None and self._control.health.status.connected:
                routes.fleet.CopyFrom(
                    convert.fleet_status(self._fleet.member_id, self._fleet.leader, self._fleet.members())
                )
        return routes

    def ListRevisions(self, request: pb.ListRevisionsRequest, context: Context) -> pb.ListRevisionsResponse:
        revisions = self._control.revisions(_page(request.limit, 20))
        listed = (convert.routes(r.revision, r.at, DesiredState.from_json(r.document)) for r in revisions)
        return pb.ListRevisionsResponse(revisions=convert.within(listed, PAGE_BYTES))

    def ListVersions(self, request: pb.ListVersionsRequest, context: Context) -> pb.ListVersionsResponse:
        self._control.refresh()
        return convert.versions(self._control.versions(request.endpoint))

    def LoadVersion(self, request: pb.LoadVersionRequest, context: Context) -> pb.ChangeResponse:
        return self._change(
            self._control.load_version, request, request.endpoint, request.version, request.path, request.sha256
        )

    def UnloadVersion(self, request: pb.UnloadVersionRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.unload_version, request, request.endpoint, request.version)

    def SetTraffic(self, request: pb.SetTrafficRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.set_traffic, request, request.endpoint, dict(request.weights))

    def SetLabel(self, request: pb.SetLabelRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.set_label, request, request.endpoint, request.label, request.version)

    def Promote(self, request: pb.PromoteRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.promote, request, request.endpoint)

    def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.ChangeResponse:
        return self._change(
            self._control.rollback,
            request,
            request.endpoint,
            to_version=request.to_version,
            to_revision=request.to_revision,
        )

    def Switch(self, request: pb.SwitchRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.switch, request, request.endpoint, request.version)

    def Apply(self, request: pb.ApplyRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.apply, request, request.document, source=request.source)

    def SetShadow(self, request: pb.SetShadowRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.set_shadow, request, request.endpoint, request.version, request.percent)

    def GetShadowReport(self, request: pb.GetShadowReportRequest, context: Context) -> pb.ShadowReport:
        endpoint = self._control.state.endpoint(request.endpoint)
        window, top = request.window_seconds or 3600, _page(request.top, 10)
        peers = self._peers
        report, percent = self._shadow.report(
            endpoint.name,
            endpoint.shadows,
            request.shadow_version,
            window,
            top,
            others=None
            if peers is None
            else lambda version: peers.shadow_summaries(endpoint.name, version, window, top),
            past_shadows=lambda: self._control.past_shadows(endpoint.name),
            seen_elsewhere=None if peers is None else lambda: peers.shadows_seen(endpoint.name),
        )
        return convert.shadow_report(report, percent)

    def SetGuardrails(self, request: pb.SetGuardrailsRequest, context: Context) -> pb.ChangeResponse:
        return self._change(
            self._control.set_guardrails,
            request,
            request.endpoint,
            list(request.rules),
            at_least=request.at_least or 1,
            observe_only=request.observe_only,
        )

    def SetFault(self, request: pb.SetFaultRequest, context: Context) -> pb.ChangeResponse:
        fault = None if request.clear else Fault(error_rate=request.error_rate, latency_ms=request.latency_ms)
        return self._change(self._control.set_fault, request, request.endpoint, request.version, fault)

    def SetBatching(self, request: pb.SetBatchingRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.set_batching, request, request.endpoint, convert.batching(request))

    def SetRunner(self, request: pb.SetRunnerRequest, context: Context) -> pb.ChangeResponse:
        return self._change(self._control.set_runner, request, request.endpoint, request.runner)

    def StartRollout(self, request: pb.StartRolloutRequest, context: Context) -> pb.RolloutStatus:
        state = self._rollouts.start(
            ACTOR.get(),
            request.endpoint,
            request.version,
            steps=list(request.steps),
            step_seconds=request.step_seconds,
            rules=list(request.guardrails) or None,
            at_least=request.at_least,
            reason=_reason(request),
            dry_run=request.dry_run,
        )
        return convert.rollout(state, dry_run=request.dry_run)

    def GetRollout(self, request: pb.RolloutRequest, context: Context) -> pb.RolloutStatus:
        return convert.rollout(self._rollouts.require(request.endpoint))

    def PauseRollout(self, request: pb.RolloutRequest, context: Context) -> pb.RolloutStatus:
        return convert.rollout(self._rollouts.pause(ACTOR.get(), request.endpoint, reason=_reason(request)))

    def ResumeRollout(self, request: pb.RolloutRequest, context: Context) -> pb.RolloutStatus:
        return convert.rollout(self._rollouts.resume(ACTOR.get(), request.endpoint, reason=_reason(request)))

    def AbortRollout(self, request: pb.RolloutRequest, context: Context) -> pb.RolloutStatus:
        return convert.rollout(self._rollouts.abort(ACTOR.get(), request.endpoint, reason=_reason(request)))

    def ListIncidents(self, request: pb.ListIncidentsRequest, context: Context) -> pb.ListIncidentsResponse:
        records = self._incidents.list(request.endpoint, _page(request.limit, 50))
        return pb.ListIncidentsResponse(incidents=convert.within((convert.incident(r) for r in records), PAGE_BYTES))

    def GetIncident(self, request: pb.GetIncidentRequest, context: Context) -> pb.Incident:
        return convert.incident(self._incidents.get(request.id))

    def GetAudit(self, request: pb.GetAuditRequest, context: Context) -> pb.GetAuditResponse:
        limit = _page(request.limit, 100)
        budget = min(request.max_bytes or AUDIT_PAGE_BYTES, AUDIT_PAGE_BYTES)
        # One more than asked for: whether older entries remain is then known without a second query.
        entries = self._control.audit(request.endpoint, limit + 1, request.before_id)
        return convert.audit(entries[:limit], budget, more=len(entries) > limit)
