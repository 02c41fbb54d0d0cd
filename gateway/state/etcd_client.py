"""`EtcdClient`: the one place that talks to etcd, through etcd's v3 JSON gateway over HTTP.

Why the JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, ...) over httpx and not a
gRPC client: the `etcd3` package cannot load with protobuf 7 (its generated code is too old),
`aetcd` works but is asyncio-only while every `StateStore` call is synchronous and made from
worker threads, and the gateway is part of etcd's stable v3 API on every etcd since 3.4. httpx
brings TLS with client certificates and connection pooling; a watch is one streaming POST
whose socket `wake()` shuts down to end it at once.

The client fails over between the endpoints of a cluster, authenticates with user and
password when given (re-authenticating when etcd expires the token), and raises
StoreUnavailable naming the store for anything that keeps a call from completing. Leases
(for process membership and a leader, later) are more calls of the same kind: `call()`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from gateway.errors import InvalidInput, StoreUnavailable

# httpx logs every request at INFO: for a store polled by the guardian each second, that is noise.
logging.getLogger("httpx").setLevel(logging.WARNING)

#: etcd's gRPC status codes that the gateway returns in its JSON errors.
_UNAUTHENTICATED = 16
_OUT_OF_RANGE = 11  # "mvcc: required revision has been compacted"
DEFAULT_PREFIX = "/gateway"
_QUERY_FILES = ("cacert", "cert", "key")


def encode(text: str) -> str:
    """A key or value as the JSON gateway wants bytes: base64."""
    return base64.b64encode(text.encode()).decode()


def decode(value: str) -> str:
    """The inverse of `encode`."""
    return base64.b64decode(value).decode()


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (etcd's `range_end` for a prefix)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Compacted(Exception):  # a signal between client and store, never shown to a caller
    """A watch asked for history etcd has compacted away; re-read the current state."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"compacted at etcd revision {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class EtcdSettings:
    """Where the cluster is and how to reach it.

    From a URL: `etcd://HOST:PORT[,HOST:PORT...][/prefix]`, or `etcds://...` for TLS with
    optional `?cacert=FILE&cert=FILE&key=FILE` (client certificate). User and password come
    from the environment (`GATEWAY_ETCD_USER`, `GATEWAY_ETCD_PASSWORD`), never the URL, so
    they stay out of process listings and logs.
    """

    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    tls: bool = False
    cacert: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    connect_timeout: float = 2.0
    request_timeout: float = 5.0

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str]) -> EtcdSettings:
        """Parse a store URL (raises InvalidInput saying what is valid)."""
        parts = urlsplit(url)
        usage = "use etcd://HOST:PORT[,HOST:PORT...][/prefix] (etcds:// for TLS)"
        if parts.scheme not in ("etcd", "etcds") or not parts.netloc:
            raise InvalidInput(f"store URL {url!r} names no etcd endpoint; {usage}")
        if "@" in parts.netloc:
            raise InvalidInput(
                f"store URL {url!r} carries credentials; set GATEWAY_ETCD_USER and GATEWAY_ETCD_PASSWORD instead"
            )
        endpoints = tuple(_endpoint(item, url, usage) for item in parts.netloc.split(","))
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - set(_QUERY_FILES))
        if unknown:
            raise InvalidInput(f"store URL {url!r}: unknown option {unknown[0]!r}; valid: {', '.join(_QUERY_FILES)}")
        files = {name: query[name][-1] for name in _QUERY_FILES if name in query}
        if files and parts.scheme != "etcds":
            raise InvalidInput(f"store URL {url!r}: certificate files need TLS; use etcds://")
        prefix = parts.path.rstrip("/") or DEFAULT_PREFIX
        user = environ.get("GATEWAY_ETCD_USER", "")
        password = environ.get("GATEWAY_ETCD_PASSWORD", "")
        if password and not user:
            raise InvalidInput("GATEWAY_ETCD_PASSWORD is set but GATEWAY_ETCD_USER is not")
        return cls(
            endpoints,
            prefix,
            parts.scheme == "etcds",
            cacert=files.get("cacert", ""),
            cert=files.get("cert", ""),
            key=files.get("key", ""),
            user=user,
            password=password,
        )

    @property
    def url(self) -> str:
        """The store's URL as logs and messages show it (no credentials)."""
        return f"{'etcds' if self.tls else 'etcd'}://{','.join(self.endpoints)}{self.prefix}"


def _endpoint(item: str, url: str, usage: str) -> str:
    host, _, port = item.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"store URL {url!r}: {item!r} is not HOST:PORT; {usage}")
    return item


class EtcdClient:
    """A pooled HTTP connection to one etcd cluster: calls, watches, failover, TLS and auth."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.url = settings.url
        scheme = "https" if settings.tls else "http"
        self._bases = [f"{scheme}://{endpoint}" for endpoint in settings.endpoints]
        self._current = 0
        verify: ssl.SSLContext | bool = False
        if settings.tls:
            verify = ssl.create_default_context(cafile=settings.cacert or None)
            if settings.cert:
                verify.load_cert_chain(settings.cert, settings.key or None)
        self._timeout = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
        self._http = httpx.Client(verify=verify, timeout=self._timeout)
        self._lock = threading.Lock()
        self._token = ""
        self._watching: dict[socket.socket, threading.Event] = {}

    # --- plain calls -------------------------------------------------------------------------

    def call(self, path: str, body: Mapping[str, Any], *, idempotent: bool = True) -> dict[str, Any]:
        """POST one JSON request (`/v3/kv/range`, ...) to the first endpoint that answers.

        A request that never reached etcd is retried on the next endpoint; one that may
        have (the answer was lost) is retried only when `idempotent`, else its outcome is
        unknown and StoreUnavailable says so.
        """
        last = ""
        for _ in range(2 * len(self._bases)):
            base = self._bases[self._current]
            try:
                response = self._http.post(base + path, json=body, headers=self._headers())
            except httpx.TransportError as err:
                last = f"{base}: {_describe(err)}"
                if not idempotent and not isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
                    raise StoreUnavailable(
                        f"the state store {self.url} did not answer ({last}); the change may or may not "
                        "have committed: check `gateway admin audit` before retrying"
                    ) from None
                self._current = (self._current + 1) % len(self._bases)
                continue
            answer = self._answer(response)
            if answer is not None:
                return answer
            last = f"{base}: the auth token expired"
        raise StoreUnavailable(f"the state store {self.url} is unreachable ({last})")

    def _answer(self, response: httpx.Response) -> dict[str, Any] | None:
        """The JSON answer; None when the auth token expired (forgotten, so a retry re-authenticates)."""
        if response.status_code == 200:
            answer: dict[str, Any] = response.json()
            return answer
        error = _error(response.text)
        if error.get("code") == _UNAUTHENTICATED and self.settings.user:
            self._token = ""
            return None
        if error.get("code") == _OUT_OF_RANGE:
            raise Compacted(0)
        raise StoreUnavailable(f"the state store {self.url} refused the call: {error.get('message', response.text)}")

    def _headers(self) -> dict[str, str]:
        if not self.settings.user:
            return {}
        with self._lock:
            if not self._token:
                self._token = self._authenticate()
            return {"Authorization": self._token}

    def _authenticate(self) -> str:
        body = {"name": self.settings.user, "password": self.settings.password}
        for offset in range(len(self._bases)):
            base = self._bases[(self._current + offset) % len(self._bases)]
            try:
                response = self._http.post(base + "/v3/auth/authenticate", json=body)
            except httpx.TransportError:
                continue
            if response.status_code != 200:
                raise StoreUnavailable(
                    f"the state store {self.url} refused user {self.settings.user!r}: "
                    f"{_error(response.text).get('message', response.text)}"
                )
            token: str = response.json()["token"]
            return token
        raise StoreUnavailable(f"the state store {self.url} is unreachable (authenticating {self.settings.user!r})")

    # --- watches -----------------------------------------------------------------------------

    def watch_once(
        self, key: str, range_end: str, start_revision: int, timeout: float, stop: threading.Event
    ) -> list[dict[str, Any]]:
        """The first events on keys in [key, range_end) from `start_revision`, waiting up to `timeout` s.

        Returns [] when nothing happened in time, when etcd ended the stream, or when `stop`
        is set and `wake()` called. Raises Compacted when `start_revision` is compacted away.
        """
        create = {"key": encode(key), "range_end": encode(range_end), "start_revision": str(start_revision)}
        settings = self.settings
        timeout_config = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout, read=timeout)
        last = ""
        for _ in range(2 * len(self._bases)):
            base = self._bases[self._current]
            try:
                with self._http.stream(
                    "POST",
                    base + "/v3/watch",
                    json={"create_request": create},
                    headers=self._headers(),
                    timeout=timeout_config,
                ) as response:
                    if response.status_code != 200:
                        response.read()
                        if self._answer(response) is None:
                            continue  # token expired: authenticate again
                    return self._events(response, stop)
            except httpx.ReadTimeout:
                return []
            except httpx.TransportError as err:
                if stop.is_set():
                    return []
                last = f"{base}: {_describe(err)}"
                self._current = (self._current + 1) % len(self._bases)
        raise StoreUnavailable(f"the state store {self.url} is unreachable ({last})")

    def _events(self, response: httpx.Response, stop: threading.Event) -> list[dict[str, Any]]:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with self._lock:
                self._watching[sock] = stop
        try:
            if stop.is_set():
                return []
            for line in response.iter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    error = message["error"]
                    detail = error.get("message", error) if isinstance(error, dict) else error
                    raise StoreUnavailable(f"the state store {self.url} ended a watch: {detail}")
                result = message.get("result", {})
                if result.get("canceled"):
                    if result.get("compact_revision"):
                        raise Compacted(int(result["compact_revision"]))
                    raise StoreUnavailable(
                        f"the state store {self.url} cancelled a watch: {result.get('cancel_reason', 'no reason')}"
                    )
                events: list[dict[str, Any]] = result.get("events", [])
                if events:
                    return events
            return []
        finally:
            if sock is not None:
                with self._lock:
                    self._watching.pop(sock, None)

    def wake(self) -> None:
        """End the watches whose `stop` is set, now (shutting their sockets down wakes the reading thread)."""
        with self._lock:
            sockets = [sock for sock, stop in self._watching.items() if stop.is_set()]
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


def _error(text: str) -> dict[str, Any]:
    try:
        error = json.loads(text)
    except ValueError:
        return {}
    return error if isinstance(error, dict) else {}


def _describe(err: httpx.TransportError) -> str:
    return str(err) or type(err).__name__
