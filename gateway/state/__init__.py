"""Durable state: the `StateStore` protocol and the records it keeps.

A store keeps the desired state as a sequence of numbered revisions (each a JSON document)
and an append-only audit log. A change commits with compare-and-swap on the revision
number, together with its audit entry, in one transaction: after a crash the store holds
the old revision or the new one with its audit entry, never a mix.

It also knows which processes are alive (members, each on a lease it renews) and who holds a
lock (the guardian leader): a lock lives as long as its holder's membership. Writes made
inside `fenced(lock, member)` commit only while that member still holds the lock, in the same
transaction, so a leader that lost its lease (paused, cut off) cannot act after another took over.

Records carry a version that every write of them changes, so a read-modify-write can commit
with compare-and-swap (`swap_record`); `swapping(RecordSwap)` makes a record write ride on the
next route commit or audit entry, in the same transaction (a rollout's step and its traffic
change commit together, or neither does).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.errors import InvalidInput, LockLost, RecordChanged


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
    """Where desired state and the audit log live: SQLite for one host, etcd for many.

    Every call may raise StoreUnavailable (naming the store) when the store cannot be reached.
    """

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

    def audit(self, endpoint: str | None = None, limit: int = 100, before_id: int = 0) -> list[AuditEntry]:
        """Audit entries, newest first, optionally for one endpoint; with `before_id`, only older ones."""

    def put_record(self, kind: str, key: str, body: str, at: float) -> None:
        """Store (or replace) a JSON record: a rollout's state, an incident."""

    def commit_record(
        self, kind: str, key: str, body: str, at: float, audit: AuditDraft, *, version: int
    ) -> AuditEntry:
        """Store a record and its audit entry in one transaction if the record is still at `version` (0: absent).

        A batch read pointer moving: raises RecordChanged, writing neither, when another write came first.
        """

    def get_record(self, kind: str, key: str) -> str | None:
        """One record's JSON body, or None."""

    def list_records(self, kind: str, limit: int = 100) -> list[tuple[str, float, str]]:
        """(key, at, body) of a kind, newest first."""

    def create_record(self, kind: str, key: str, body: str, at: float) -> str:
        """Store a record unless it exists; the stored body either way (the first writer's wins)."""

    def read_record(self, kind: str, key: str) -> tuple[str, int] | None:
        """One record's body and version (every write changes the version), or None."""

    def swap_record(self, kind: str, key: str, body: str, at: float, version: int) -> int:
        """Store a record if its version is still `version` (0: it must not exist); the new version.

        Raises RecordChanged, writing nothing, when another write came first.
        """

    # --- the fleet: who is alive, who leads ----------------------------------------------------

    def join(self, member: str, body: str, ttl: float) -> None:
        """Register a live member (`body`: how to reach it) for `ttl` seconds unless `renew`ed."""

    def renew(self, member: str) -> bool:
        """Keep a member (and its locks) alive for another ttl; False when it had expired: join again."""

    def leave(self, member: str) -> None:
        """Remove a member now, with the locks it holds."""

    def members(self) -> list[tuple[str, str]]:
        """(member, body) of every live member, by member id."""

    def acquire(self, lock: str, member: str) -> str:
        """Hold `lock` for `member` while it stays a member, unless another live member holds it.

        Returns the holder after the call ("" when nobody can hold it: `member` is not live).
        """

    def wait_for_change(self, after: int, timeout: float, stop: threading.Event) -> list[Revision]:
        """Revisions newer than `after`, oldest first; when there are none, wait up to `timeout` seconds for one.

        Returns early (possibly empty) once `stop` is set and `wake()` is called. Every
        process sharing the store calls this in a loop from the revision it serves, so a
        change committed by any of them reaches all.
        """

    def wake(self) -> None:
        """Make the `wait_for_change` calls in progress whose `stop` is set return now."""

    def close(self) -> None:
        """Release connections."""


_FENCE: ContextVar[tuple[str, str] | None] = ContextVar("gateway_store_fence", default=None)


@contextmanager
def fenced(lock: str, member: str) -> Iterator[None]:
    """Writes this thread makes inside commit only while `member` holds `lock` (else LockLost, nothing written).

    The check is part of each write's own transaction, not a read before it: a leader paused
    past its lease cannot write after another process took over.
    """
    token = _FENCE.set((lock, member))
    try:
        yield
    finally:
        _FENCE.reset(token)


def current_fence() -> tuple[str, str] | None:
    """(lock, member) the current writes must be fenced by, or None."""
    return _FENCE.get()


@dataclass
class RecordSwap:
    """A record write that commits only if the record is still at `version` (0: absent), with another write."""

    kind: str
    key: str
    body: str
    at: float
    version: int
    #: The record's version once written (0 until then).
    written: int = 0


_SWAP: ContextVar[RecordSwap | None] = ContextVar("gateway_store_swap", default=None)


@contextmanager
def swapping(swap: RecordSwap) -> Iterator[RecordSwap]:
    """The first route commit or audit entry this thread writes inside also writes `swap`, in its transaction.

    When the record is no longer at `swap.version` that write raises RecordChanged and nothing
    is written. A block that wrote neither leaves `swap.written` at 0: write it with `swap_record`.
    """
    token = _SWAP.set(swap)
    try:
        yield swap
    finally:
        _SWAP.reset(token)


def pending_swap() -> RecordSwap | None:
    """The record swap the next write in this thread must carry, or None (none, or already written)."""
    swap = _SWAP.get()
    return swap if swap is not None and not swap.written else None


def lock_lost(lock: str, member: str, holder: str) -> LockLost:
    """The error of a fenced write whose member no longer holds `lock` (`holder`: who does, or "")."""
    held = f"held by {holder}" if holder else "held by nobody"
    return LockLost(f"{member} no longer holds {lock} ({held} now); nothing was written")


def record_changed(swap: RecordSwap, found: int) -> RecordChanged:
    """The error of a swap that found the record at another version."""
    now = f"version {found}" if found else "no record"
    return RecordChanged(
        f"the {swap.kind} record {swap.key} changed meanwhile ({now}, expected "
        f"{f'version {swap.version}' if swap.version else 'no record'}); nothing was written"
    )


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """Whether this process reaches its store, as last seen."""

    url: str
    connected: bool
    #: When the state last changed (seconds since the epoch).
    since: float
    #: The last failure, when not connected.
    error: str = ""


class StoreHealth:
    """Owns this process's view of the store connection: every store call's outcome updates it.

    The control plane reports a refused change here at once, and the follower reports each
    wait, so operators see a lost store in `gateway admin routes` and in a metric.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._status = StoreStatus(url, True, clock())
        self._listeners: list[Callable[[StoreStatus], None]] = []

    def on_change(self, listener: Callable[[StoreStatus], None]) -> None:
        """Call `listener(status)` when the store becomes reachable or unreachable."""
        self._listeners.append(listener)

    @property
    def status(self) -> StoreStatus:
        """The latest status (an immutable snapshot)."""
        return self._status

    def reached(self) -> None:
        """A store call succeeded."""
        self._set(True, "")

    def lost(self, error: str) -> None:
        """A store call failed because the store could not be reached."""
        self._set(False, error)

    def _set(self, connected: bool, error: str) -> None:
        with self._lock:
            old = self._status
            if old.connected == connected and old.error == error:
                return
            since = old.since if old.connected == connected else self._clock()
            self._status = StoreStatus(old.url, connected, since, error)
        if old.connected != connected:
            for listener in self._listeners:
                listener(self._status)


#: Where `gateway serve` and the batch tools keep state unless told otherwise.
DEFAULT_STORE_URL = "sqlite:///var/gateway.db"


def open_store(url: str, environ: Mapping[str, str] | None = None) -> StateStore:
    """A store from its URL.

    - `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`: one host (several processes may share the file);
    - `etcd://HOST:PORT[,HOST:PORT...][/prefix]` (`etcds://` for TLS, with `?cacert=&cert=&key=` files):
      many hosts; user and password come from `GATEWAY_ETCD_USER` and `GATEWAY_ETCD_PASSWORD`.
    """
    if url.startswith(("etcd://", "etcds://")):
        from gateway.state.etcd import EtcdStore

        return EtcdStore.from_url(url, os.environ if environ is None else environ)
    if url.startswith("sqlite:///"):
        from gateway.state.sqlite import SqliteStore

        path = url.removeprefix("sqlite:///")
        if not path:
            raise InvalidInput(f"store URL {url!r} has no path; use {DEFAULT_STORE_URL}")
        return SqliteStore(Path(path), url=url)
    raise InvalidInput(
        f"store URL {url!r} is not supported; use sqlite:///PATH (relative), sqlite:////PATH (absolute) "
        "or etcd://HOST:PORT[,HOST:PORT...][/prefix]"
    )
