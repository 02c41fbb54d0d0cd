"""`gateway.v1.Admin`: authenticated (by the guard), converts, calls the control plane off the loop."""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import grpc

from gateway.control import ControlPlane
from gateway.desired import DesiredState
from gateway.grpc import admin_converters as convert
from gateway.grpc.errors import ACTOR
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext


class AdminServicer(pb_grpc.AdminServicer):
    """Admin RPCs; each runs its control-plane call in a worker thread.

    Store I/O and model loading must not hold up the event loop that also serves predictions.
    """

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(function, *args, **kwargs)

    async def GetRoutes(self, request: pb.GetRoutesRequest, context: Context) -> pb.Routes:
        control = self._control
        if request.revision and request.revision != control.revision:
            stored = await self._call(control.store.get_revision, request.revision)
            return convert.routes(
                stored.revision, stored.at, DesiredState.from_json(stored.document), request.endpoint
            )
        revision, state = control.revision, control.state
        stored = await self._call(control.store.get_revision, revision)
        return convert.routes(revision, stored.at, state, request.endpoint)

    async def ListRevisions(
        self, request: pb.ListRevisionsRequest, context: Context
    ) -> pb.ListRevisionsResponse:
        revisions = await self._call(self._control.revisions, request.limit or 20)
        return pb.ListRevisionsResponse(
            revisions=[
                convert.routes(r.revision, r.at, DesiredState.from_json(r.document)) for r in revisions
            ]
        )

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Context
    ) -> pb.ListVersionsResponse:
        return convert.versions(self._control.versions(request.endpoint))

    async def LoadVersion(self, request: pb.LoadVersionRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.load_version,
            ACTOR.get(),
            request.endpoint,
            request.version,
            request.path,
            request.sha256,
            reason=request.reason,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def UnloadVersion(self, request: pb.UnloadVersionRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.unload_version,
            ACTOR.get(),
            request.endpoint,
            request.version,
            reason=request.reason,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def SetTraffic(self, request: pb.SetTrafficRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.set_traffic,
            ACTOR.get(),
            request.endpoint,
            dict(request.weights),
            reason=request.reason,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def SetLabel(self, request: pb.SetLabelRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.set_label,
            ACTOR.get(),
            request.endpoint,
            request.label,
            request.version,
            reason=request.reason,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def Promote(self, request: pb.PromoteRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.promote,
            ACTOR.get(),
            request.endpoint,
            reason=request.reason,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.rollback,
            ACTOR.get(),
            request.endpoint,
            reason=request.reason,
            to_version=request.to_version,
            to_revision=request.to_revision,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def Switch(self, request: pb.SwitchRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.switch,
            ACTOR.get(),
            request.endpoint,
            request.version,
            reason=request.reason,
            dry_run=request.dry_run,
        )
        return convert.change_response(result)

    async def Apply(self, request: pb.ApplyRequest, context: Context) -> pb.ChangeResponse:
        result = await self._call(
            self._control.apply,
            ACTOR.get(),
            request.document,
            reason=request.reason,
            dry_run=request.dry_run,
            source=request.source,
        )
        return convert.change_response(result)

    async def GetAudit(self, request: pb.GetAuditRequest, context: Context) -> pb.GetAuditResponse:
        entries = await self._call(self._control.audit, request.endpoint, request.limit or 100)
        return convert.audit(entries)
