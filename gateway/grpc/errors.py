"""The one place where domain errors become gRPC statuses.

Every servicer is registered through `guard_servicer`, which wraps each of its RPCs once: a
`GatewayError` becomes its status with the error's message; anything else becomes INTERNAL
with a generic message and an id that points at the logged traceback.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from gateway.errors import ErrorCode, GatewayError

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


def _abort_internal(method: str) -> tuple[grpc.StatusCode, str]:
    error_id = uuid.uuid4().hex
    log.exception("unexpected error in %s (error id %s)", method, error_id)
    return grpc.StatusCode.INTERNAL, f"internal error; quote error id {error_id} when reporting it"


#: The authenticated caller of the current RPC (set when a servicer is guarded with `authenticate`).
ACTOR: ContextVar[str] = ContextVar("actor", default="")

Authenticate = Callable[[Any], str]


def guard(
    method: str, behavior: Behavior, authenticate: Authenticate | None = None
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Wrap one unary behavior (sync or async) with the error mapping (and authentication).

    A sync behavior (pure CPU work, like Predict) runs inside the one coroutine gRPC needs
    anyway, so the mapping costs no extra frame per call.
    """
    if inspect.iscoroutinefunction(behavior) or authenticate is not None:

        async def guarded_async(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if authenticate is not None:
                    ACTOR.set(authenticate(context))
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except GatewayError as err:
                await context.abort(STATUS[err.code], err.message)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await context.abort(*_abort_internal(method))

        return guarded_async

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return behavior(request, context)
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


def guard_servicer(
    servicer: object,
    service: ServiceDescriptor,
    authenticate: Authenticate | None = None,
    *,
    threaded: bool = False,
) -> Any:
    """A stand-in for `servicer` whose every RPC of `service` is wrapped by `guard`.

    Applied once at registration instead of as a server interceptor: an aio interceptor
    costs an extra coroutine per call on the hot path, for the same mapping. With
    `authenticate`, every RPC checks credentials first, so no RPC can forget to. `threaded`
    selects the wrapper for a thread-pool server.
    """
    wrap = guard_sync if threaded else guard
    return SimpleNamespace(
        **{m.name: wrap(m.full_name, getattr(servicer, m.name), authenticate) for m in service.methods}
    )
