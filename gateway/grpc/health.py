"""Keeps `grpc.health.v1.Health` in step with readiness: overall ("") and per endpoint name."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from gateway.inference import InferenceService

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAMES = ("gateway.v1.Inference", "inference.GRPCInferenceService")


class HealthReporter:
    """Publishes readiness to the health service; `refresh_soon` is safe from any thread."""

    def __init__(self, service: InferenceService, loop: asyncio.AbstractEventLoop) -> None:
        self.servicer = health.aio.HealthServicer()
        self._service = service
        self._loop = loop

    async def refresh(self) -> None:
        """Recompute every status from the current routes and registry."""
        ready = self._service.server_ready()
        overall = SERVING if ready else NOT_SERVING
        await self.servicer.set("", overall)
        for name in SERVICE_NAMES:
            await self.servicer.set(name, overall)
        for endpoint in self._service.endpoints():
            await self.servicer.set(endpoint, SERVING if self._service.is_ready(endpoint) else NOT_SERVING)

    def refresh_soon(self) -> None:
        """Schedule a refresh on the server's loop (callable from loader threads)."""
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.refresh(), self._loop)

    async def shut_down(self) -> None:
        """Report NOT_SERVING everywhere before the server stops accepting calls."""
        await self.servicer.enter_graceful_shutdown()
