"""`grpc.health.v1.Health`, kept in step with readiness: overall ("") and per endpoint name.

The servicer is the gateway's own (a status table with Check, List and Watch) rather than
grpcio-health-checking's: that package's generated code pins the protobuf runtime to its own
release, which broke the gateway as soon as a client library moved protobuf.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from gateway.inference import InferenceService
from gateway.pb.grpc.health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE_NAMES = ("gateway.v1.Inference", "inference.GRPCInferenceService")
Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus.ValueType


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The status of each service name; Watch streams every change. Used from the server's loop only."""

    def __init__(self) -> None:
        self._statuses: dict[str, Status] = {}
        self._watchers: dict[str, set[asyncio.Queue[Status]]] = {}
        self._shutting_down = False

    def set(self, service: str, status: Status) -> None:
        """Set one status (ignored once shutting down: NOT_SERVING is final)."""
        if self._shutting_down:
            return
        self._publish(service, status)

    def _publish(self, service: str, status: Status) -> None:
        if self._statuses.get(service) == status:
            return
        self._statuses[service] = status
        for queue in self._watchers.get(service, ()):
            if queue.full():  # a slow watcher only needs the newest status
                queue.get_nowait()
            queue.put_nowait(status)

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service, for good."""
        for service in list(self._statuses):
            self._publish(service, NOT_SERVING)
        self._shutting_down = True

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {request.service!r}; known: '' (overall), service and endpoint names",
            )
        return health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]  # abort raised

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service, status in self._statuses.items():
            response.statuses[service].status = status
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        queue: asyncio.Queue[Status] = asyncio.Queue(maxsize=1)
        watchers = self._watchers.setdefault(request.service, set())
        watchers.add(queue)
        try:
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            yield health_pb2.HealthCheckResponse(status=status)
            while True:
                status = await queue.get()
                yield health_pb2.HealthCheckResponse(status=status)
        finally:
            watchers.discard(queue)


class HealthReporter:
    """Publishes readiness to the health service; `refresh_soon` is safe from any thread."""

    def __init__(self, service: InferenceService, loop: asyncio.AbstractEventLoop) -> None:
        self.servicer = HealthServicer()
        self._service = service
        self._loop = loop

    async def refresh(self) -> None:
        """Recompute every status from the current routes and registry."""
        ready = self._service.server_ready()
        overall = SERVING if ready else NOT_SERVING
        self.servicer.set("", overall)
        for name in SERVICE_NAMES:
            self.servicer.set(name, overall)
        for endpoint in self._service.endpoints():
            self.servicer.set(endpoint, SERVING if self._service.is_ready(endpoint) else NOT_SERVING)

    def refresh_soon(self) -> None:
        """Schedule a refresh on the server's loop (callable from loader threads)."""
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.refresh(), self._loop)

    async def shut_down(self) -> None:
        """Report NOT_SERVING everywhere before the server stops accepting calls."""
        self.servicer.enter_graceful_shutdown()
