"""The one place where domain errors become gRPC statuses.

Every servicer is registered through `guard_servicer`, which wraps each of its RPCs once: a
`GatewayError` becomes its status with the error's message; anything else becomes INTERNAL
with a generic message and an id that points at the logged traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from types import CoroutineType, SimpleNamespace
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from gateway.errors import ErrorCode, GatewayError
from gateway.grpc.drain import Drain
from gateway.limits import MAX_ERROR_CHARS
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
#: Trailing metadata with the milliseconds after which a retry may succeed (gRPC's server pushback).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def refusal(err: GatewayError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status, message (cut to MAX_ERROR_CHARS: it may quote caller input) and trailing metadata of an error."""
    message = err.message
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + f"... ({len(err.message)} characters, cut)"
    metadata: tuple[tuple[str, str], ...] = ()
    if err.retry_after_seconds is not None:
        metadata = ((RETRY_PUSHBACK_KEY, str(max(0, round(err.retry_after_seconds * 1000)))),)
    return STATUS[err.code], message, metadata


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
#: Told when the caller of the current RPC leaves (deadline or cancellation) while its answer waits.
ON_ABANDON: ContextVar[Callable[[], None] | None] = ContextVar("on_abandon", default=None)
TRACE_ID_KEY = "trace-id"


Stamp = Callable[[Any, str], None]
#: Builds a stream's in-band error reply: (request, status, message) -> response.
Refuse = Callable[[Any, grpc.StatusCode, str], Any]

_PEERS: dict[str, dict[str, Any]] = {}


def peer_attributes(peer: str) -> dict[str, Any]:
    """`network.peer.address` / `network.peer.port` from gRPC's peer string (cached per connection)."""
    attributes = _PEERS.get(peer)
    if attributes is None:
        kind, _, rest = peer.partition(":")
        if kind in ("ipv4", "ipv6"):
            host, _, port = rest.rpartition(":")
            attributes = {"network.peer.address": host.strip("[]")}
            if port.isdigit():
                attributes["network.peer.port"] = int(port)
        else:
            attributes = {"network.peer.address": rest or peer}
        if len(_PEERS) > 10_000:
            _PEERS.clear()
        _PEERS[peer] = attributes
    return attributes


def _span_attributes(method: str, listener: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(span name `package.Service/Method`, method name, the attributes every call of it shares)."""
    service, _, name = method.lstrip("/").rpartition("/")
    static = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, **listener}
    return f"{service}/{name}", name, static


def _traced(
    method: str, behavior: Behavior, spans: SpanRecorder, stamp: Stamp, listener: Mapping[str, Any]
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """`guard` with a span per call (a behavior that returns a coroutine has it awaited).

    The trace id reaches the caller in the response (`stamp`) when the call succeeds and in
    the `trace-id` trailing metadata when it fails: setting trailing metadata on every call
    costs the aio server more than the rest of the span work.
    """
    span_name, _, static = _span_attributes(method, listener)
    untraced = guard(method, behavior)

    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        span = spans.start_span(span_name, context.invocation_metadata())
        if span is None:  # not sampled
            return await untraced(request, context)
        attributes = span.attributes
        attributes.update(static)
        attributes.update(peer_attributes(context.peer()))
        CURRENT_SPAN.set(span)  # each RPC runs in its own task, so this stays within the call
        TRACE_ID.set(span.trace_id_hex)
        try:
            response = behavior(request, context)
            if type(response) is CoroutineType:  # the request waits (a batch, a runner thread)
                response = await response
        except asyncio.CancelledError:
            _left(span, spans, context)
            raise
        except GatewayError as err:
            status, message, extra = refusal(err)
            span.fail(status.value[0], status.name, message)
            spans.end(span)
            await context.abort(status, message, trailing_metadata=((TRACE_ID_KEY, span.trace_id_hex), *extra))
        except Exception:
            status, message = _abort_internal(method, span.trace_id_hex)
            span.fail(status.value[0], status.name, "unexpected error")
            spans.end(span)
            await context.abort(status, message, trailing_metadata=((TRACE_ID_KEY, span.trace_id_hex),))
        if PENDING_DELAY.get():
            try:
                await _wait(context)
            except asyncio.CancelledError:
                _left(span, spans, context)
                raise
        attributes["rpc.grpc.status_code"] = 0
        spans.end(span)
        stamp(response, span.trace_id_hex)
        return response

    return traced


def guard_stream(
    method: str,
    behavior: Behavior,
    refuse: Refuse,
    *,
    spans: SpanRecorder | None = None,
    stamp: Stamp | None = None,
    listener: Mapping[str, Any] | None = None,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """A bidirectional stream that answers each message with `behavior`, in order.

    A message that fails gets `refuse(request, status, message)` as its reply and the stream
    goes on: one bad request must not end a stream that carries many. Each traced message has
    its own span (the requests of one stream are routed one by one).
    """
    span_name, _, static = _span_attributes(method, listener or {})

    async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        peer = peer_attributes(context.peer()) if spans is not None else {}
        metadata = context.invocation_metadata() if spans is not None else None
        async for request in requests:
            span = spans.start_span(span_name, metadata) if spans is not None else None
            if span is not None:
                span.attributes.update(static)
                span.attributes.update(peer)
                TRACE_ID.set(span.trace_id_hex)
            CURRENT_SPAN.set(span)
            trace_id = span.trace_id_hex if span is not None else ""
            try:
                response, status, message = await _one_message(method, behavior, refuse, request, context, trace_id)
            except asyncio.CancelledError:
                if span is not None:
                    _left(span, spans, context)  # type: ignore[arg-type]
                raise
            if span is not None:
                if status is grpc.StatusCode.OK:
                    span.attributes["rpc.grpc.status_code"] = 0
                else:
                    span.fail(status.value[0], status.name, message)
                spans.end(span)  # type: ignore[union-attr]
                if stamp is not None:
                    stamp(response, trace_id)
            yield response

    return streamed


async def _one_message(  # noqa: PLR0917 - one stream message
    method: str, behavior: Behavior, refuse: Refuse, request: Any, context: grpc.aio.ServicerContext, trace_id: str
) -> tuple[Any, grpc.StatusCode, str]:
    """The reply to one stream message, its status and error message (an error becomes an in-band reply)."""
    try:
        response = behavior(request, context)
        if type(response) is CoroutineType:  # the request waits (a batch, a runner thread)
            response = await response
    except GatewayError as err:
        status, message, _ = refusal(err)
        return refuse(request, status, message), status, message
    except Exception:
        status, message = _abort_internal(method, trace_id)
        return refuse(request, status, message), status, message
    if PENDING_DELAY.get():
        await _wait(context)
        PENDING_DELAY.set(0.0)
        ON_ABANDON.set(None)
    return response, grpc.StatusCode.OK, ""


async def _wait(context: grpc.aio.ServicerContext) -> None:
    """Wait out an injected delay; a caller that leaves meanwhile is reported to `ON_ABANDON`."""
    try:
        await asyncio.sleep(PENDING_DELAY.get())
    except asyncio.CancelledError:
        abandoned = ON_ABANDON.get()
        if abandoned is not None:
            abandoned()
        raise


def _left(span: SpanRecord, spans: SpanRecorder, context: grpc.aio.ServicerContext) -> None:
    """End the span of a call whose caller left (its deadline, or a cancellation) before the answer."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
    span.fail(code.value[0], code.name, "the caller left before the answer")
    spans.end(span)


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


#: The authenticated caller of the current RPC (set when a servicer is guarded with `authenticate`).
ACTOR: ContextVar[str] = ContextVar("actor", default="")

Authenticate = Callable[[Any], str]


def guard(
    method: str,
    behavior: Behavior,
    spans: SpanRecorder | None = None,
    stamp: Stamp | None = None,
    listener: Mapping[str, Any] | None = None,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Wrap one sync unary behavior with the error mapping (and a span, given `spans` and `stamp`).

    The behavior (pure CPU work, like Predict) runs inside the one coroutine gRPC needs
    anyway, so the mapping costs no extra frame per call. `listener` holds the span
    attributes of the listening socket (`server.address`, `server.port`).
    """
    if spans is not None and stamp is not None:
        return _traced(method, behavior, spans, stamp, listener or {})
    if inspect.iscoroutinefunction(behavior):
        return _guard_async(method, behavior)

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            response = behavior(request, context)
            if type(response) is CoroutineType:  # the request waits (a batch, a runner thread)
                response = await response
            if PENDING_DELAY.get():
                await _wait(context)
            return response
        except GatewayError as err:
            status, message, extra = refusal(err)
            await context.abort(status, message, trailing_metadata=extra)
        except Exception:
            await context.abort(*_abort_internal(method))

    return guarded


def _guard_async(method: str, behavior: Behavior) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """`guard` for a behavior that awaits (blocking work it hands to a thread)."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except GatewayError as err:
            status, message, extra = refusal(err)
            await context.abort(status, message, trailing_metadata=extra)
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
            status, message, extra = refusal(err)
            if extra:
                context.set_trailing_metadata(extra)
            context.abort(status, message)
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
    streams: Mapping[str, Refuse] | None = None,
    listener: Mapping[str, Any] | None = None,
    drain: Drain | None = None,
) -> Any:
    """A stand-in for `servicer` whose every RPC of `service` is wrapped by `guard` (aio server).

    Applied once at registration instead of as a server interceptor: an aio interceptor
    costs an extra coroutine per call on the hot path, for the same mapping. With `spans`,
    the RPCs named in `traced` get a span each; their value puts the trace id into a
    successful response. The bidirectional streams named in `streams` answer message by
    message (`guard_stream`); the servicer's method answers one message. With `drain`, each
    call counts as in flight, and new calls are refused once the listener shuts down.
    """
    stamps = traced or {}
    refusals = streams or {}
    wrapped: dict[str, Callable[[Any, grpc.aio.ServicerContext], Any]] = {}
    for m in service.methods:
        behavior = getattr(servicer, m.name)
        if m.name in refusals:
            stamp = stamps.get(m.name)
            stream = guard_stream(
                _path(m), behavior, refusals[m.name], spans=spans if stamp else None, stamp=stamp, listener=listener
            )
            wrapped[m.name] = _drained_stream(stream, drain) if drain else stream
        else:
            unary = guard(_path(m), behavior, spans, stamps.get(m.name), listener)
            wrapped[m.name] = _drained(unary, drain) if drain else unary
    return SimpleNamespace(**wrapped)


def _drained(
    unary: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], drain: Drain
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Count the call as in flight; once the listener drains, refuse it with UNAVAILABLE (retry elsewhere)."""

    async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if drain.closing:
            await _refuse(context, drain)
        drain.active += 1
        try:
            return await unary(request, context)
        finally:
            drain.active -= 1

    return counted


async def _refuse(context: grpc.aio.ServicerContext, drain: Drain) -> None:
    """Refuse a call on a draining listener through the one error map (NotReady: UNAVAILABLE)."""
    status, message, metadata = refusal(drain.refuse())
    await context.abort(status, message, trailing_metadata=metadata)


def _drained_stream(
    stream: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], drain: Drain
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """Refuse new streams once the listener drains; open ones run until the grace period ends."""

    async def opened(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if drain.closing:
            await _refuse(context, drain)
        async for response in stream(requests, context):
            yield response

    return opened


def guard_threaded_servicer(servicer: object, service: ServiceDescriptor, authenticate: Authenticate) -> Any:
    """`guard_servicer` for a thread-pool server: every RPC checks credentials first, so none can forget to."""
    return SimpleNamespace(
        **{m.name: guard_sync(_path(m), getattr(servicer, m.name), authenticate) for m in service.methods}
    )
