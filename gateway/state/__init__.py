"""Durable state: the `StateStore` protocol and the records it keeps.

A store keeps the desired state as a sequence of numbered revisions (each a JSON document)
and an append-only audit log. A change commits with compare-and-swap on the revision
number, together with its audit entry, in one transaction: after a crash the store holds
the old revision or the new one with its audit entry, never a mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Revision:
    """One committed desired state."""

    revision: int
    at: float
    document: str


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """What an audit entry says before the store numbers it."""

    at: float
    actor: str
    action: str
    endpoint: str
    reason: str
    dry_run: bool
    revision_before: int
    changes: Sequence[dict[str, Any]] = ()
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the append-only audit log: who, when, what, why."""

    id: int
    at: float
    actor: str
    action: str
    endpoint: str
    reason: str
    dry_run: bool
    revision_before: int
    revision_after: int
    changes: Sequence[dict[str, Any]]
    detail: dict[str, Any]


class StateStore(Protocol):
    """Where desired state and the audit log live (SQLite today; a store for replicas implements the same calls)."""

    url: str

    def latest(self) -> Revision | None:
        """The newest committed revision, or None when the store is empty."""

    def get_revision(self, revision: int) -> Revision:
        """One revision (NotFound when it does not exist)."""

    def revisions(self, limit: int = 50) -> list[Revision]:
        """The newest revisions, newest first."""

    def commit(self, expected_revision: int, document: str, audit: AuditDraft) -> tuple[Revision, AuditEntry]:
        """Store `document` as the next revision if the newest is still `expected_revision`.

        Raises Conflict otherwise. The audit entry commits in the same transaction.
        """

    def append_audit(self, audit: AuditDraft) -> AuditEntry:
        """Record an entry that changes no state (a dry run, a refused change)."""

    def audit(self, endpoint: str | None = None, limit: int = 100) -> list[AuditEntry]:
        """Audit entries, newest first, optionally for one endpoint."""

    def put_record(self, kind: str, key: str, body: str, at: float) -> None:
        """Store (or replace) a JSON record: a rollout's state, an incident."""

    def commit_record(self, kind: str, key: str, body: str, at: float, audit: AuditDraft) -> AuditEntry:
        """Store a record and its audit entry in one transaction (a batch read pointer moving)."""

    def get_record(self, kind: str, key: str) -> str | None:
        """One record's JSON body, or None."""

    def list_records(self, kind: str, limit: int = 100) -> list[tuple[str, float, str]]:
        """(key, at, body) of a kind, newest first."""

    def close(self) -> None:
        """Release connections."""


#: Where `gateway serve` and the batch tools keep state unless told otherwise.
DEFAULT_STORE_URL = "sqlite:///var/gateway.db"


def open_store(url: str) -> StateStore:
    """A store from its URL: `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
    if url.startswith("sqlite:///"):
        from gateway.state.sqlite import SqliteStore

        path = url.removeprefix("sqlite:///")
        if not path:
            raise InvalidInput(f"store URL {url!r} has no path; use {DEFAULT_STORE_URL}")
        return SqliteStore(Path(path), url=url)
    raise InvalidInput(f"store URL {url!r} is not supported; use sqlite:///PATH (relative) or sqlite:////PATH")
