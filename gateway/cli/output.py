"""Printing helpers shared by the subcommands: tables, JSON, one-line errors."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc


def fail(message: str, code: int = 1) -> int:
    """Print one clear error line to stderr and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def rpc_failure(err: grpc.RpcError) -> int:
    """One line for a failed RPC: status name and the server's message."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return fail(f"{code.name if code else 'ERROR'}: {details}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers], *[["" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_json(value: Any) -> None:
    """JSON on stdout."""
    print(json.dumps(value, indent=2, sort_keys=False))


def when(timestamp: float) -> str:
    """A UTC timestamp for humans."""
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) + "Z"
