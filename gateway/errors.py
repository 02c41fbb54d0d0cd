"""The domain error tree.

Every error the gateway means to show a caller is a `GatewayError` with a transport-free
`ErrorCode`; the gRPC layer maps codes to statuses in one place (`gateway/grpc/errors.py`, applied to every RPC
at registration).
Messages say what was wrong and what is valid; they never carry secrets or stack traces.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.Enum):
    """What kind of failure an error is, independent of any transport."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"


class GatewayError(Exception):
    """Base of every error meant for a caller; `code` says how a transport should report it."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    #: When set, a retry has a chance after this many seconds (transports send it as a hint).
    retry_after_seconds: float | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(GatewayError):
    """A request or setting is malformed: wrong shape, datatype, weights, names."""

    code = ErrorCode.INVALID_ARGUMENT


class ConfigError(InvalidInput):
    """A route file or setting is invalid; the message names the field and what is valid."""


class NotFound(GatewayError):
    """An endpoint, version, label or record does not exist."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(GatewayError):
    """Something that must be unique exists already (a version, a run id)."""

    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(GatewayError):
    """The request is well formed but the current state refuses it (version not ready, ...)."""

    code = ErrorCode.FAILED_PRECONDITION


class ArtifactError(FailedPrecondition):
    """A model artifact is missing, unreadable, or its digest differs from its manifest."""


class Conflict(GatewayError):
    """A concurrent change won; retrying on the new state may succeed."""

    code = ErrorCode.ABORTED


class LockLost(Conflict):
    """A write made for the holder of a lock (the guardian leader) found the lock lost: nothing was written."""


class RecordChanged(Conflict):
    """A record (a rollout's state) changed since it was read: nothing was written; read it again and decide again."""


class TooLarge(GatewayError):
    """A request exceeds a configured limit (batch size, message size)."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class Overloaded(TooLarge):
    """A version already has as many requests in flight as it may; retry after `retry_after_seconds`."""

    def __init__(self, message: str, *, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class NotReady(GatewayError):
    """The target exists but cannot serve right now (loading, failed, draining)."""

    code = ErrorCode.UNAVAILABLE


class StoreUnavailable(GatewayError):
    """The state store cannot be reached (or refused the call): routes keep serving, changes wait.

    The message names the store (its URL without credentials) and what failed.
    """

    code = ErrorCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    """The caller's deadline passed before the work could finish."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Unauthenticated(GatewayError):
    """No credentials were presented."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    """Credentials were presented but are not valid for this call."""

    code = ErrorCode.PERMISSION_DENIED
