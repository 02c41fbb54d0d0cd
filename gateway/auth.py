"""Admin credentials: named bearer tokens, compared in constant time, never logged."""

from __future__ import annotations

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
