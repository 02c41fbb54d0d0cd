"""The one place where domain errors become gRPC statuses.

Every servicer is registered through `guard_servicer`, which wraps each of its RPCs once: a
`GatewayError` becomes its status with the error's message; anything else becomes INTERNAL
with a generic message and an id that points at the logged traceback.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from gateway.errors import ErrorCode, GatewayError
from gateway.logs import TRACE_ID
from gateway.telemetry.tracing import SpanRecord, SpanRecorder

log = logging.getLogger(__name__)

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.ABORTED: grpc.StatusCode.ABORTED,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def _abort_internal(method: str, trace_id: str = "") -> tuple[grpc.StatusCode, str]:
    if trace_id:
        log.exception("unexpected error in %s (trace id %s)", method, trace_id)
        return grpc.StatusCode.INTERNAL, f"internal error; trace id {trace_id}"
    error_id = uuid.uuid4().hex
    log.exception("unexpected error in %s (error id %s)", method, error_id)
    return grpc.StatusCode.INTERNAL, f"internal error; quote error id {error_id} when reporting it"


#: The span of the current RPC, for servicers to hand to the domain (None when not traced).
CURRENT_SPAN: ContextVar[SpanRecord | None] = ContextVar("span", default=None)
#: Seconds the current RPC must wait before answering (an injected latency fault); 0 almost always.
PENDING_DELAY: ContextVar[float] = ContextVar("pending_delay", default=0.0)
TRACE_ID_KEY = "trace-id"


Stamp = Callable[[Any, str], None]


def _traced(
    method: str, behavior: Behavior, spans: SpanRecorder, stamp: Stamp
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """`guard` for a sync behavior, with a span per call.

    The trace id reaches the caller in the response (`stamp`) when the call succeeds and in
    the `trace-id` trailing metadata when it fails: setting trailing metadata on every call
    costs the aio server more than the rest of the span work.
    """
    service, _, name = method.rpartition("/")
    static = {"rpc.system": "grpc", "rpc.service": service.lstrip("/"), "rpc.method": name}
    untraced = guard(method, behavior)

    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        span = spans.start_span(name, context.invocation_metadata())
        if span is None:  # not sampled
            return await untraced(request, context)
        span.attributes.update(static)
        CURRENT_SPAN.set(span)  # each RPC runs in its own task, so this stays within the call
        TRACE_ID.set(span.trace_id_hex)
        try:
            response = behavior(request, context)
        except GatewayError as err:
            status = STATUS[err.code]
            span.fail(status.value[0], status.name, err.message)
            spans.end(span)
            await context.abort(status, err.message, trailing_metadata=((TRACE_ID_KEY, span.trace_id_hex),))
        except Exception:
            status, message = _abort_internal(method, span.trace_id_hex)
            span.fail(status.value[0], status.name, "unexpected error")
            spans.end(span)
            await context.abort(status, message, trailing_metadata=((TRACE_ID_KEY, span.trace_id_hex),))
        if PENDING_DELAY.get():
            await asyncio.sleep(PENDING_DELAY.get())
        span.attributes["rpc.grpc.status_code"] = 0
        spans.end(span)
        stamp(response, span.trace_id_hex)
        return response

    return traced


#: The authenticated caller of the current RPC (set when a servicer is guarded with `authenticate`).
ACTOR: ContextVar[str] = ContextVar("actor", default="")

Authenticate = Callable[[Any], str]


def guard(
    method: str,
    behavior: Behavior,
    spans: SpanRecorder | None = None,
    stamp: Stamp | None = None,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Wrap one sync unary behavior with the error mapping (and a span, given `spans` and `stamp`).

    The behavior (pure CPU work, like Predict) runs inside the one coroutine gRPC needs
    anyway, so the mapping costs no extra frame per call.
    """
    if spans is not None and stamp is not None:
        return _traced(method, behavior, spans, stamp)

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            response = behavior(request, context)
            if PENDING_DELAY.get():
                await asyncio.sleep(PENDING_DELAY.get())
            return response
        except GatewayError as err:
            await context.abort(STATUS[err.code], err.message)
        except Exception:
            await context.abort(*_abort_internal(method))

    return guarded


def guard_sync(method: str, behavior: Behavior, authenticate: Authenticate | None = None) -> Behavior:
    """`guard` for thread-pool servers (the admin listener): the same mapping, synchronously."""

    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if authenticate is not None:
                ACTOR.set(authenticate(context))
            return behavior(request, context)
        except GatewayError as err:
            context.abort(STATUS[err.code], err.message)
        except Exception:
            context.abort(*_abort_internal(method))

    return guarded


def _path(method: MethodDescriptor) -> str:
    """The RPC's path as gRPC names it: `/package.Service/Method`."""
    return f"/{method.containing_service.full_name}/{method.name}"


def guard_servicer(
    servicer: object,
    service: ServiceDescriptor,
    *,
    spans: SpanRecorder | None = None,
    traced: Mapping[str, Stamp] | None = None,
) -> Any:
    """A stand-in for `servicer` whose every RPC of `service` is wrapped by `guard` (aio server).

    Applied once at registration instead of as a server interceptor: an aio interceptor
    costs an extra coroutine per call on the hot path, for the same mapping. With `spans`,
    the RPCs named in `traced` get a span each; their value puts the trace id into a
    successful response.
    """
    stamps = traced or {}
    return SimpleNamespace(
        **{m.name: guard(_path(m), getattr(servicer, m.name), spans, stamps.get(m.name)) for m in service.methods}
    )


def guard_threaded_servicer(servicer: object, service: ServiceDescriptor, authenticate: Authenticate) -> Any:
    """`guard_servicer` for a thread-pool server: every RPC checks credentials first, so none can forget to."""
    return SimpleNamespace(
        **{m.name: guard_sync(_path(m), getattr(servicer, m.name), authenticate) for m in service.methods}
    )
