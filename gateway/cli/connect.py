"""Where and how client commands connect: targets and tokens (flags first, then the environment), channels.

- inference address (`predict`): `--target`, else `$GATEWAY_TARGET`, else `localhost:8001`;
- admin address (`admin`, `rollout`, `incidents`, `report`, `runbook`): `--target`, else
  `$GATEWAY_ADMIN_TARGET`, else `localhost:8002`;
- admin token: `--token`, else `$GATEWAY_ADMIN_TOKEN`;
- the channel: plaintext, or TLS with `--tls-ca` (and mTLS with `--tls-cert`/`--tls-key`).

`gateway serve` has its own settings object (`gateway/settings.py`); this is the client side.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

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


ENV_TARGET = "GATEWAY_TARGET"
ENV_ADMIN_TARGET = "GATEWAY_ADMIN_TARGET"
ENV_ADMIN_TOKEN = "GATEWAY_ADMIN_TOKEN"
DEFAULT_TARGET = "localhost:8001"
DEFAULT_ADMIN_TARGET = "localhost:8002"
DEFAULT_TIMEOUT = 30.0


def inference_target(args: argparse.Namespace) -> str:
    """The inference address: `--target`, else `$GATEWAY_TARGET`, else localhost:8001."""
    return getattr(args, "target", None) or os.environ.get(ENV_TARGET) or DEFAULT_TARGET


def connection_options() -> argparse.ArgumentParser:
    """`--target`, `--token`, `--timeout`, `--json` of the admin commands: accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help=f"the gateway's admin address (default ${ENV_ADMIN_TARGET}, else {DEFAULT_ADMIN_TARGET})",
    )
    common.add_argument("--token", default=argparse.SUPPRESS, help=f"admin bearer token (default ${ENV_ADMIN_TOKEN})")
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print strict JSON (non-finite numbers as null) instead of text",
    )
    add_tls_options(common, suppress=True)
    return common


class AdminClient:
    """An authenticated Admin stub built from the shared connection options."""

    def __init__(self, args: argparse.Namespace) -> None:
        from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc

        self.target = getattr(args, "target", None) or os.environ.get(ENV_ADMIN_TARGET) or DEFAULT_ADMIN_TARGET
        token = getattr(args, "token", None) or os.environ.get(ENV_ADMIN_TOKEN, "")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
        self.channel = open_channel(self.target, args)
        self.stub = pb_grpc.AdminStub(self.channel)

    def call(self, method: str, request: Any) -> Any:
        """Invoke an Admin RPC with the token and timeout."""
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()
