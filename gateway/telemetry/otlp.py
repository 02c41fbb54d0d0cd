"""OTLP/gRPC span export written for this gateway's span records.

The SDK's OTLP exporter builds protobuf objects attribute by attribute (about 65 us per span
here, more than the gateway's whole request path); this module writes the same
`ExportTraceServiceRequest` wire format directly from `SpanRecord`s, caching the encoded
bytes of repeated attributes (endpoint, version, arm, ...), at a few microseconds per span.
The resource and scope are encoded once with the generated classes. It honours the
standard OTLP settings: `OTEL_EXPORTER_OTLP[_TRACES]_{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION,
CERTIFICATE}`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

from gateway import __version__
from gateway.telemetry.tracing import ExportError, SpanRecord

log = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: Codes after which OTLP says to send the batch again, with backoff (RESOURCE_EXHAUSTED only with
#: RetryInfo, which this exporter does not read).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_PACK_FIXED64 = struct.Struct("<Q").pack
_PACK_DOUBLE = struct.Struct("<d").pack


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _PACK_DOUBLE(value)
    return _field(1, str(value).encode())


class SpanEncoder:
    """Encodes span records as OTLP `ExportTraceServiceRequest` bytes."""

    def __init__(self, resource: Resource) -> None:
        pb_resource = resource_pb2.Resource(
            attributes=[
                common_pb2.KeyValue(key=str(k), value=common_pb2.AnyValue(string_value=str(v)))
                for k, v in resource.attributes.items()
            ]
        )
        scope = common_pb2.InstrumentationScope(name="gateway", version=__version__)
        self._resource = _field(1, pb_resource.SerializeToString())
        self._scope = _field(1, scope.SerializeToString())
        self._attributes: dict[tuple[str, Any], bytes] = {}

    def _attribute(self, key: str, value: Any) -> bytes:
        cache_key = (key, value)
        encoded = self._attributes.get(cache_key)
        if encoded is None:
            encoded = _field(9, _field(1, key.encode()) + _field(2, _any_value(value)))
            if len(self._attributes) < 50_000 and key != "gateway.request_id":
                self._attributes[cache_key] = encoded
        return encoded

    def span(self, record: SpanRecord) -> bytes:
        """One `Span` message (without its field tag)."""
        parts = [
            b"\x0a\x10" + record.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + record.span_id.to_bytes(8, "big"),
        ]
        if record.parent:
            parts.append(b"\x22\x08" + record.parent.to_bytes(8, "big"))
        parts.append(_field(5, record.name.encode()))
        parts.append(b"\x30" + _varint(_KIND[record.kind]))
        parts.append(b"\x39" + _PACK_FIXED64(record.start_ns))
        parts.append(b"\x41" + _PACK_FIXED64(record.end_ns))
        attribute = self._attribute
        parts.extend(attribute(k, v) for k, v in record.attributes.items())
        for trace_id, span_id in record.links:
            parts.append(
                _field(13, b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big"))
            )
        if not record.ok:
            parts.append(_field(15, _field(2, record.message.encode()) + b"\x18\x02"))
        return b"".join(parts)

    def request(self, records: Sequence[SpanRecord]) -> bytes:
        """A whole export request for a batch of records."""
        spans = b"".join(_field(2, self.span(r)) for r in records)
        scope_spans = _field(2, self._scope + spans)
        return _field(1, self._resource + scope_spans)


@dataclass(frozen=True)
class OtlpOptions:
    """How OTLP exports are sent: headers, the collector's CA, the timeout and compression."""

    headers: tuple[tuple[str, str], ...] = ()
    certificate: Path | None = None
    timeout: float = 10.0
    compression: grpc.Compression | None = None

    @classmethod
    def parse(cls, headers: str, certificate: Path | None, timeout: float, gzip: bool) -> OtlpOptions:
        """From the settings' forms (headers as KEY=VALUE,KEY=VALUE, as OTEL_EXPORTER_OTLP_HEADERS)."""
        pairs = tuple(
            (key.strip().lower(), value.strip())
            for key, _, value in (h.partition("=") for h in headers.split(",") if "=" in h)
        )
        return cls(pairs, certificate, timeout, grpc.Compression.Gzip if gzip else None)

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials trusting the configured CA (or the system's roots)."""
        return grpc.ssl_channel_credentials(self.certificate.read_bytes() if self.certificate else None)


class OtlpSpanSink:
    """Sends encoded batches to an OTLP/gRPC collector; the recorder keeps and retries what failed."""

    def __init__(self, endpoint: str, resource: Resource, options: OtlpOptions | None = None) -> None:
        options = options or OtlpOptions()
        self.encoder = SpanEncoder(resource)
        target = endpoint.split("://", 1)[-1].rstrip("/")
        secure = endpoint.startswith("https://")
        # Reconnect within a couple of seconds of a collector coming back (gRPC's default backoff
        # grows to two minutes, and calls fail fast until the next attempt).
        channel_options = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
        if secure:
            self._channel = grpc.secure_channel(target, options.credentials(), options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._metadata = options.headers
        self._timeout = options.timeout
        self._compression = options.compression
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=lambda payload: payload,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        self.failures = 0

    def __call__(self, records: Sequence[SpanRecord]) -> None:
        """Export one batch; ExportError says whether sending it again may succeed (OTLP's retryable codes)."""
        try:
            self._export(
                self.encoder.request(records),
                metadata=self._metadata,
                timeout=self._timeout,
                compression=self._compression,
                wait_for_ready=True,  # a call made while reconnecting waits for the channel, within the timeout
            )
        except grpc.RpcError as err:
            self.failures += 1
            code = err.code()
            raise ExportError(f"OTLP {code.name}", retryable=code in RETRYABLE) from None

    def shutdown(self) -> None:
        """Close the channel."""
        self._channel.close()
