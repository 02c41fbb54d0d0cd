"""Server assembly: `create_server(gateway, listen) -> (server, port)`, separate from running it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.app import Gateway
from gateway.auth import AdminTokens
from gateway.errors import GatewayError, InvalidInput
from gateway.grpc.admin_servicer import AdminServicer, ShadowPeers
from gateway.grpc.drain import Drain
from gateway.grpc.errors import guard_servicer, guard_threaded_servicer, refusal
from gateway.grpc.health import HealthReporter
from gateway.grpc.oip_extensions import stamp_stream, stream_refusal
from gateway.grpc.reflection import enable_reflection
from gateway.grpc.servicers import OpenInferenceServicer, PredictServicer, stamp_model_infer, stamp_predict
from gateway.grpc.tls import ServerTls
from gateway.pb.gateway.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from gateway.pb.grpc.health.v1 import health_pb2, health_pb2_grpc
from gateway.pb.inference import grpc_service_pb2, grpc_service_pb2_grpc

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
OPEN_INFERENCE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]


@dataclass
class InferenceServer:
    """A started inference listener and what belongs to it."""

    server: grpc.aio.Server
    port: int
    health: HealthReporter
    drain: Drain

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, finish those in flight, then stop; all within `grace` seconds."""
        started = time.monotonic()
        await self.health.shut_down()
        await self.drain.drain(grace)
        await self.server.stop(max(0.0, grace - (time.monotonic() - started)))


def server_options(max_message_bytes: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments shared by the gateway's listeners.

    SO_REUSEPORT is off unless asked for, so a second gateway started on a taken port fails
    instead of silently taking half its connections; `--workers N` asks for it.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
    ]


def bind(server: grpc.aio.Server | grpc.Server, listen: str, tls: ServerTls | None = None) -> int:
    """Bind a port (TLS when given); raise InvalidInput naming the address when it cannot be bound."""
    try:
        port: int = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError as err:
        raise InvalidInput(f"cannot listen on {listen}: {err}") from None
    if port == 0:
        raise InvalidInput(f"cannot listen on {listen}: the address is in use or invalid")
    return port


def listener_attributes(listen: str, port: int) -> dict[str, Any]:
    """`server.address` and `server.port` of a listener, for its spans (the host name when bound to all)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return {"server.address": host, "server.port": port}


async def start_inference_server(
    gateway: Gateway, listen: str, tokens: AdminTokens | None = None, tls: ServerTls | None = None
) -> InferenceServer:
    """Build and start the inference listener (Predict, Open Inference Protocol, health, reflection).

    `tokens` admit the Open Inference Protocol's repository load/unload, which are admin
    operations; without them every such call is refused. `tls`: serve TLS (or mTLS) only.
    """
    server = grpc.aio.server(options=server_options(gateway.settings.max_message_bytes, gateway.settings.reuse_port))
    port = bind(server, listen, tls)
    listener = listener_attributes(listen, port)
    spans = gateway.telemetry.spans
    drain = Drain()
    inference_pb2_grpc.add_InferenceServicer_to_server(
        guard_servicer(
            PredictServicer(gateway.inference, gateway.feedback),
            INFERENCE,
            spans=spans,
            traced={"Predict": stamp_predict},
            listener=listener,
            drain=drain,
        ),
        server,
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        guard_servicer(
            OpenInferenceServicer(
                gateway.inference,
                gateway.control,
                gateway.telemetry,
                bearer_authenticator(tokens or AdminTokens({})),
                server_name=gateway.settings.server_name,
            ),
            OPEN_INFERENCE,
            spans=spans,
            traced={"ModelInfer": stamp_model_infer, "ModelStreamInfer": stamp_stream},
            streams={"ModelStreamInfer": stream_refusal},
            listener=listener,
            drain=drain,
        ),
        server,
    )
    health = HealthReporter(gateway.inference, asyncio.get_running_loop())
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    enable_reflection(
        [INFERENCE.full_name, OPEN_INFERENCE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
        server,
    )
    await health.refresh()
    gateway.registry.on_change(lambda _snapshot: health.refresh_soon())
    gateway.control.on_change(lambda _revision, _state: health.refresh_soon())
    await server.start()
    return InferenceServer(server, port, health, drain)


def authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The call's `authorization` metadata value (the last one), or None."""
    found = None
    for key, value in metadata or ():
        if key == "authorization":
            found = value if isinstance(value, str) else value.decode()
    return found


def bearer_authenticator(tokens: AdminTokens) -> Callable[[Any], str]:
    """Reads `authorization` metadata and returns the caller's name (raises on bad credentials)."""

    def authenticate(context: Any) -> str:  # grpc.ServicerContext or its aio counterpart
        return tokens.authenticate(authorization(context.invocation_metadata()))

    return authenticate


@dataclass
class AdminServer:
    """A started admin listener (a thread-pool server, apart from the inference event loop)."""

    server: grpc.Server
    port: int

    async def stop(self, grace: float = 5.0) -> None:
        """Finish in-flight admin calls for up to `grace` seconds."""
        await asyncio.to_thread(lambda: self.server.stop(grace).wait())


ADMIN_WORKERS = 4


class _ReflectionNeedsToken(grpc.ServerInterceptor):  # type: ignore[misc]
    """Server reflection on the admin listener answers only callers with a valid token.

    Without it, anyone who can reach the admin port could list the admin API; the RPCs
    themselves are guarded, but their shape is nobody else's business.
    """

    def __init__(self, tokens: AdminTokens) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """Reflection calls without a valid token get a handler that refuses them."""
        if not details.method.startswith("/grpc.reflection."):
            return continuation(details)
        try:
            self._tokens.authenticate(authorization(details.invocation_metadata))
        except GatewayError as err:
            status, message, _ = refusal(err)

            def refuse(_requests: Any, context: grpc.ServicerContext) -> Any:
                context.abort(status, message)

            return grpc.stream_stream_rpc_method_handler(refuse)
        return continuation(details)


async def start_admin_server(
    gateway: Gateway,
    listen: str,
    tokens: AdminTokens,
    tls: ServerTls | None = None,
    *,
    peers: ShadowPeers | None = None,
) -> AdminServer:
    """Build and start the admin listener; every RPC (reflection included) is authenticated with a bearer token.

    Admin calls run in their own worker threads: a commit's fsync or a model load never
    blocks the event loop that serves predictions. With `peers` (the other processes of the
    fleet), reports add up every live process's summaries.
    """
    authenticate = bearer_authenticator(tokens)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=ADMIN_WORKERS, thread_name_prefix="admin"),
        options=server_options(gateway.settings.max_message_bytes, gateway.settings.reuse_port),
        interceptors=[_ReflectionNeedsToken(tokens)],
    )
    servicer = AdminServicer(
        gateway.control, gateway.shadow, gateway.rollouts, gateway.incidents, fleet=gateway.fleet, peers=peers
    )
    admin_pb2_grpc.add_AdminServicer_to_server(guard_threaded_servicer(servicer, ADMIN, authenticate), server)
    enable_reflection([ADMIN.full_name], server)
    port = bind(server, listen, tls)
    server.start()
    return AdminServer(server, port)
