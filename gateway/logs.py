"""Logging: one setup for every command, plain text or JSON lines, with the request in context.

The request path sets `REQUEST_ID` (and the transport `TRACE_ID` when the call is traced);
every record logged while a request is being served carries both, in text as
`[request_id=... trace_id=...]` and in JSON as fields, so a log line about a request can
be joined with its trace and with the client's own logs. Each gRPC call runs in its own
task (or admin worker thread), so the context never leaks from one call to the next.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal, TextIO

#: The id of the request being served (the caller's `request_id`, or the one the gateway made).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
#: The trace id (32 hex digits) of the call being served, when it is traced.
TRACE_ID: ContextVar[str] = ContextVar("trace_id", default="")

LogFormat = Literal["text", "json"]
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"


class RequestContext(logging.Filter):
    """Adds `request_id`, `trace_id` and a ready-made `context` suffix to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; only annotates it."""
        request_id, trace_id = REQUEST_ID.get(), TRACE_ID.get()
        record.request_id = request_id
        record.trace_id = trace_id
        parts = [f"request_id={request_id}"] if request_id else []
        if trace_id:
            parts.append(f"trace_id={trace_id}")
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, request and trace ids."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, "")
            if value:
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def configure_logging(level: str = "INFO", log_format: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Route every `gateway` (and library) log record to `stream` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestContext())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
