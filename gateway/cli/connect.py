"""Client channels for the CLI: plaintext, or TLS with `--tls-ca` (and mTLS with `--tls-cert`/`--tls-key`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from gateway.errors import ConfigError


def add_tls_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """`--tls-ca`, `--tls-cert`, `--tls-key` (`suppress`: for options given before or after a subcommand)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--tls-ca", default=default, metavar="PEM", help="CA certificate: connect with TLS")
    parser.add_argument("--tls-cert", default=default, metavar="PEM", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", default=default, metavar="PEM", help="client private key, for mutual TLS")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {path}: {err.strerror}") from None


def open_channel(target: str, args: argparse.Namespace) -> grpc.Channel:
    """A channel to `target`: TLS when `--tls-ca` is given, with a client certificate when `--tls-cert` is."""
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if ca is None:
        if cert or key:
            raise ConfigError("--tls-cert and --tls-key need --tls-ca (the CA that signed the server's certificate)")
        return grpc.insecure_channel(target)
    if bool(cert) != bool(key):
        raise ConfigError("mutual TLS needs both --tls-cert and --tls-key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key") if key else None,
        certificate_chain=_read(cert, "client certificate") if cert else None,
    )
    return grpc.secure_channel(target, credentials)
