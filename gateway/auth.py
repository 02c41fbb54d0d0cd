"""Credentials: named admin bearer tokens, and the key the processes of one gateway share; never logged."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from gateway.errors import ConfigError, PermissionDenied, Unauthenticated

ENV_TOKENS = "GATEWAY_ADMIN_TOKENS"


class AdminTokens:
    """Maps secret tokens to the names the audit log records (`oncall`, `ci`, ...)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        # name -> token; kept as bytes for hmac.compare_digest.
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    @classmethod
    def parse(cls, text: str, *, source: str) -> AdminTokens:
        """`NAME=TOKEN` pairs separated by commas or new lines; '#' starts a comment line."""
        tokens: dict[str, str] = {}
        for raw in text.replace(",", "\n").splitlines():
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            name, sep, token = entry.partition("=")
            name, token = name.strip(), token.strip()
            if not sep or not name or not token:
                raise ConfigError(f"{source}: each entry must be NAME=TOKEN (got an entry without '=' or a value)")
            if len(token) < 16:
                raise ConfigError(f"{source}: the token for {name!r} is shorter than 16 characters")
            if name in tokens:
                raise ConfigError(f"{source}: {name!r} is listed twice")
            tokens[name] = token
        return cls(tokens)

    @classmethod
    def load(cls, path: Path | None, text: str = "") -> AdminTokens:
        """From a file when given, else from `text` (the settings' $GATEWAY_ADMIN_TOKENS; empty: no admin access)."""
        if path is not None:
            try:
                return cls.parse(path.read_text(), source=str(path))
            except OSError as err:
                raise ConfigError(f"cannot read admin tokens file {path}: {err.strerror}") from None
        return cls.parse(text, source=f"${ENV_TOKENS}")

    @property
    def names(self) -> list[str]:
        """Names of the configured tokens."""
        return [name for name, _ in self._tokens]

    def authenticate(self, authorization: str | None) -> str:
        """The name behind an `authorization` header value (`Bearer TOKEN`).

        Every configured token is compared, in constant time, whatever matches first.
        """
        if not authorization:
            raise Unauthenticated("admin calls need 'authorization: Bearer <token>' metadata")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        candidate = presented.strip().encode()
        matched = ""
        for name, token in self._tokens:
            if hmac.compare_digest(candidate, token) and not matched:
                matched = name
        if not matched:
            raise PermissionDenied("the admin token is not valid")
        return matched


class FleetKey:
    """The secret the processes of one gateway share (kept in its state store, made by the first).

    Keys for each purpose are derived from it, so one leak does not serve another purpose:
    feedback ids are signed with one, calls between processes (the guardian leader pulling
    windows) carry a token made from another.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def derive(self, purpose: str) -> bytes:
        """The key for one purpose (HMAC-SHA256 of the purpose under the secret)."""
        return hmac.new(self._secret, purpose.encode(), hashlib.sha256).digest()

    @property
    def peer_token(self) -> str:
        """The bearer token of calls between the fleet's processes."""
        return self.derive("peer-calls").hex()

    def check_peer(self, authorization: str | None) -> None:
        """Refuse a call between processes without the fleet's token (compared in constant time)."""
        if not authorization:
            raise Unauthenticated("fleet calls need 'authorization: Bearer <fleet token>' metadata")
        _, _, presented = authorization.partition(" ")
        if not hmac.compare_digest(presented.strip().encode(), self.peer_token.encode()):
            raise PermissionDenied("the fleet token is not valid (another gateway's process?)")
