"""TLS and mutual TLS for the listeners, with certificates reloaded on SIGHUP without dropping connections.

The server credentials are gRPC's dynamic SSL credentials: gRPC asks `ServerTls` for the
certificate configuration before each new TLS handshake. After `request_reload` (SIGHUP)
the next handshake reads the files again; connections already open keep their session, so
a certificate rotation drops no call. A reload that fails (a missing or half-written file)
is logged and the previous certificates stay in use.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

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

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """GRPC's callback before each handshake: a new configuration after a reload request, else None."""
        if not self._reload:
            return None
        with self._lock:
            if not self._reload:
                return None
            self._reload = False
            try:
                self._configuration = self._load()
            except ConfigError as err:
                log.error("TLS reload failed, keeping the previous certificates: %s", err.message)
                return None
            self.reloads += 1
            log.info("TLS certificates reloaded from %s", self.cert)
            return self._configuration

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for `add_secure_port` (client certificates required when a client CA is set)."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration, self._fetch, require_client_authentication=self.client_ca is not None
        )
