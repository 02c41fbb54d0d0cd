"""Printing helpers shared by the subcommands: tables, strict JSON, one-line errors.

Conventions every command follows:

- `--json` prints strict JSON (RFC 8259): a number that is not finite (no samples yet, an
  unbounded histogram edge) is `null`, never `NaN` or `Infinity`, which `jq`, JavaScript
  and Go refuse. Maps (labels, traffic, errors by code) come out with their keys sorted, so
  two calls print the same text.
- Tables and text print `-` (`MISSING`) for a value that was not measured.
- Errors are one line on stderr, `error: CODE: message`, with a hint where the fix is on
  the caller's side (a token, a target), and the trace id when the gateway sent one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

#: What tables and text show for a value that was not measured.
MISSING = "-"
#: The trailing metadata key a failed, traced call carries its trace id in (gateway/grpc/errors.py).
TRACE_ID_KEY = "trace-id"


def fail(message: str, code: int = 1) -> int:
    """Print one clear error line to stderr and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def _hint(code: grpc.StatusCode | None, target: str, target_env: str) -> str:
    """What the caller can do about a refusal that is theirs to fix ("" when nothing)."""
    from gateway.cli.connect import ENV_ADMIN_TOKEN

    if code is grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"pass an admin token with --token TOKEN or export {ENV_ADMIN_TOKEN}=TOKEN "
            "(one of the gateway's GATEWAY_ADMIN_TOKENS or --admin-tokens-file)"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return f"check --token / ${ENV_ADMIN_TOKEN} against the gateway's GATEWAY_ADMIN_TOKENS or --admin-tokens-file"
    if code is grpc.StatusCode.UNAVAILABLE and target:
        where = f"--target HOST:PORT or ${target_env}" if target_env else "--target HOST:PORT"
        return f"is a gateway listening on {target}? ({where} points elsewhere)"
    return ""


def trace_id(err: grpc.RpcError) -> str:
    """The trace id a failed call carried in its trailing metadata ("" when untraced)."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == TRACE_ID_KEY:
            return str(value)
    return ""


def rpc_failure(err: grpc.RpcError, target: str = "", target_env: str = "") -> int:
    """One line for a failed RPC: status name, the server's message, a hint, the trace id.

    `target` (and the environment variable that sets it) go into the hint when the gateway
    could not be reached.
    """
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    message = f"{code.name if code else 'ERROR'}: {details}"
    hint = _hint(code, target, target_env)
    if hint:
        message += f"; {hint}"
    traced = trace_id(err)
    if traced and traced not in message:
        message += f" (trace id {traced})"
    return fail(message)


def shown(value: Any, spec: str = "") -> str:
    """A value for people: `MISSING` for None, NaN or an empty string; numbers by `spec` (e.g. `.4g`)."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, float) and math.isnan(value):
        return MISSING
    return format(value, spec) if spec else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (missing values as `MISSING`)."""
    cells = [[str(h) for h in headers], *[[shown(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def strict(value: Any) -> Any:
    """`value` made strict-JSON-ready: non-finite floats become None (recursively); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def sorted_map(value: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf map (whose iteration order is not defined) as a dict with sorted keys."""
    return {key: value[key] for key in sorted(value)}


def print_json(value: Any) -> None:
    """Strict JSON on stdout (see the module docstring)."""
    print(json.dumps(strict(value), indent=2, allow_nan=False))


def when(timestamp: float) -> str:
    """A UTC timestamp for humans (`MISSING` when there is none)."""
    if not timestamp:
        return MISSING
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) + "Z"
