"""TLS and mutual TLS for the listeners, with certificates reloaded on SIGHUP without dropping connections.

The server credentials are gRPC's dynamic SSL credentials: gRPC asks `ServerTls` for the
certificate configuration before each new TLS handshake. After `request_reload` (SIGHUP)
the next handshake reads the files again; connections already open keep their session, so
a certificate rotation drops no call. A reload that fails (a missing or half-written file)
is logged and the previous certificates stay in use. Every listener built on one `ServerTls`
(inference, admin, fleet) picks up the same reload.

`ClientTls` is the other side for the calls between a gateway's own processes (the guardian
leader pulling counts from each fleet listener): it verifies the peer's certificate against
a CA and, under mutual TLS, shows this process's own certificate; it reads its files again
after the listeners' reload.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import grpc

from gateway.errors import ConfigError

log = logging.getLogger(__name__)


def _read(path: Path, what: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {path}: {err.strerror}") from None
    if marker not in data:
        raise ConfigError(f"{path} is not a PEM {what} (no '{marker.decode()}' block)")
    return data


class ServerTls:
    """The listeners' certificate, key and optional client CA (mTLS), as files that can be reloaded."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._reload = False
        self.reloads = 0
        #: Reloads asked for (SIGHUP), successful or not: clients of the same files follow it.
        self.requested = 0
        self._configuration = self._load()  # ConfigError now, naming the file, rather than at the first handshake

    @classmethod
    def from_settings(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
        """TLS when a certificate and key are configured; None for plaintext; ConfigError when half-configured."""
        if cert is None and key is None:
            if client_ca is not None:
                raise ConfigError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
            return None
        if cert is None or key is None:
            raise ConfigError("TLS needs both tls_cert and tls_key")
        return cls(cert, key, client_ca)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert = _read(self.cert, "certificate", b"-----BEGIN CERTIFICATE-----")
        key = _read(self.key, "private key", b"PRIVATE KEY-----")
        ca = _read(self.client_ca, "client CA certificate", b"-----BEGIN CERTIFICATE-----") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def request_reload(self) -> None:
        """Read the files again before the next handshake (safe from a signal handler)."""
        self._reload = True
        self.requested += 1

    def _current(self) -> tuple[int, grpc.ServerCertificateConfiguration]:
        """(successful reloads so far, the configuration), reading the files first when a reload was asked for."""
        if self._reload:
            with self._lock:
                if self._reload:
                    self._reload = False
                    try:
                        self._configuration = self._load()
                        self.reloads += 1
                        log.info("TLS certificates reloaded from %s", self.cert)
                    except ConfigError as err:
                        log.error("TLS reload failed, keeping the previous certificates: %s", err.message)
        return self.reloads, self._configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for `add_secure_port` (client certificates required when a client CA is set).

        Each listener's credentials take the configuration of every reload once (gRPC's callback
        before each handshake returns None while nothing changed for that listener).
        """
        seen, configuration = self._current()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            reloads, current = self._current()
            if reloads == seen:
                return None
            seen = reloads
            return current

        return grpc.dynamic_ssl_server_credentials(
            configuration, fetch, require_client_authentication=self.client_ca is not None
        )


class ClientTls:
    """How this process calls the other processes' fleet listeners: the CA it trusts, its certificate for mTLS.

    `ca` None trusts gRPC's default roots. `server_name` is the name expected in the peers'
    certificates when it is not the host they advertise (one certificate for every pod).
    """

    def __init__(
        self,
        ca: Path | None,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        server_name: str = "",
        follows: ServerTls | None = None,
    ) -> None:
        self.ca, self.cert, self.key, self.server_name = ca, cert, key, server_name
        self._follows = follows
        self._requested = follows.requested if follows is not None else 0
        self._lock = threading.Lock()
        #: Credentials loaded so far (channels made with older ones are replaced).
        self.generation = 0
        self._credentials = self._load()

    @classmethod
    def for_fleet(cls, server: ServerTls | None, ca: Path | None, server_name: str = "") -> ClientTls | None:
        """The fleet client of a process whose listeners serve `server` (None: plaintext, like the listeners).

        Under mutual TLS it shows the listeners' own certificate: the other processes ask for one.
        """
        if server is None:
            if ca is not None or server_name:
                raise ConfigError(
                    "fleet_tls_ca and fleet_tls_server_name need tls_cert and tls_key: the fleet listener serves "
                    "TLS only when the other listeners do"
                )
            return None
        mutual = server.client_ca is not None
        return cls(
            ca,
            cert=server.cert if mutual else None,
            key=server.key if mutual else None,
            server_name=server_name,
            follows=server,
        )

    def _load(self) -> grpc.ChannelCredentials:
        ca = _read(self.ca, "fleet CA certificate", b"-----BEGIN CERTIFICATE-----") if self.ca else None
        cert = _read(self.cert, "certificate", b"-----BEGIN CERTIFICATE-----") if self.cert else None
        key = _read(self.key, "private key", b"PRIVATE KEY-----") if self.key else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """(generation, credentials), read again when the listeners reloaded theirs since."""
        follows = self._follows
        if follows is not None and follows.requested != self._requested:
            with self._lock:
                if follows.requested != self._requested:
                    self._requested = follows.requested
                    try:
                        self._credentials = self._load()
                        self.generation += 1
                    except ConfigError as err:
                        log.error("fleet TLS reload failed, keeping the previous files: %s", err.message)
        return self.generation, self._credentials

    def channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A TLS channel to `target` that verifies its certificate."""
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.secure_channel(target, self.current()[1], options=options)
