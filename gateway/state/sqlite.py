"""`SqliteStore`: the embedded default store (WAL mode, synchronous=FULL).

Revisions and the audit log are tables in one database file. Commits run in a `BEGIN
IMMEDIATE` transaction that checks the newest revision (compare-and-swap), inserts the new
revision and its audit entry, and commits once; triggers make the audit log append-only.

Members are rows with an expiry (the processes sharing the file share one clock), renewed by
their process; a lock is a row naming its holder, held while the holder's row is live. A
fenced write checks the lock inside its own `BEGIN IMMEDIATE` transaction, and a record swap
compares the record's version there too (every write of a record adds one to it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.errors import Conflict, NotFound, StoreUnavailable
from gateway.state import (
    AuditDraft,
    AuditEntry,
    RecordSwap,
    Revision,
    current_fence,
    lock_lost,
    pending_swap,
    record_changed,
)

#: How often a waiting follower checks for another process's commit.
POLL_SECONDS = 0.02

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    revision INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    document TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    reason TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    revision_before INTEGER NOT NULL,
    revision_after INTEGER NOT NULL,
    changes TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_endpoint ON audit (endpoint, id);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL,
    body TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS members (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS revisions_no_update BEFORE UPDATE ON revisions
BEGIN SELECT RAISE(ABORT, 'revisions are immutable'); END;
"""

_AUDIT_COLUMNS = "id, at, actor, action, endpoint, reason, dry_run, revision_before, revision_after, changes, detail"


def _why(err: BaseException) -> str:
    text = str(err)
    if "readonly" in text or "read-only" in text:
        return f"{text} (the file or its directory is read-only: the gateway needs to write both)"
    if "not a database" in text or "malformed" in text:
        return f"{text} (the file is corrupt or not a SQLite database; restore it from a backup)"
    return text


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    return AuditEntry(
        id=row[0],
        at=row[1],
        actor=row[2],
        action=row[3],
        endpoint=row[4],
        reason=row[5],
        dry_run=bool(row[6]),
        revision_before=row[7],
        revision_after=row[8],
        changes=json.loads(row[9]),
        detail=json.loads(row[10]),
    )


_OURS = frozenset({"revisions", "audit", "records"})


class SqliteStore:
    """Desired-state revisions and the audit log in one SQLite file.

    Opening checks the file before anything is written: an empty (0-byte) file, a file that is
    not a database, a database of something else, or one that cannot be written is refused
    with StoreUnavailable naming the file. Only a file that does not exist yet becomes a new
    store: existing history is never silently replaced.
    """

    def __init__(self, path: Path, *, url: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.url = url or f"sqlite:///{path}"
        self._clock = clock
        self.path = path
        self._lock = threading.Lock()
        if not path.exists():
            _create(path)
        if path.is_file() and path.stat().st_size == 0:
            raise StoreUnavailable(
                f"store {path} is an empty file (0 bytes): it holds no revisions, but the gateway will not "
                "seed over an existing file; restore it from a backup, or delete it to start a new store"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        except (OSError, sqlite3.Error) as err:
            raise StoreUnavailable(f"store {path} cannot be opened: {_why(err)}") from None
        try:
            with self._errors("open"):
                tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and not tables >= _OURS:
                    raise StoreUnavailable(
                        f"store {path} is not a gateway store (it has tables {', '.join(sorted(tables))}); "
                        "point --store at a new file or at the gateway's own database"
                    )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._migrate()
                self._check_writable()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Bring a store made by an earlier version up to this schema (records gained a version)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        if "version" not in columns:
            self._db.execute("ALTER TABLE records ADD COLUMN version INTEGER NOT NULL DEFAULT 1")

    def _check_writable(self) -> None:
        """Write (and roll back) a row, so a read-only file or directory is found now, not at the first change."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT INTO records (kind, key, at, body) VALUES ('probe', 'probe', 0, '')")
        finally:
            self._db.execute("ROLLBACK")

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """SQLite's errors as StoreUnavailable naming the file (a GatewayError the transport maps)."""
        try:
            yield
        except sqlite3.Error as err:
            raise StoreUnavailable(f"store {self.path} cannot {doing}: {_why(err)}") from err

    def latest(self) -> Revision | None:
        """The newest revision, or None."""
        with self._lock, self._errors("be read"):
            row = self._db.execute(
                "SELECT revision, at, document FROM revisions ORDER BY revision DESC LIMIT 1"
            ).fetchone()
        return Revision(*row) if row else None

    def get_revision(self, revision: int) -> Revision:
        """One revision."""
        if not 0 < revision < 1 << 63:  # SQLite integers are signed 64-bit
            newest = self.latest()
            raise NotFound(f"no revision {revision}; revisions run from 1 to {newest.revision if newest else 0}")
        with self._lock, self._errors("be read"):
            row = self._db.execute(
                "SELECT revision, at, document FROM revisions WHERE revision = ?", (revision,)
            ).fetchone()
        if row is None:
            newest = self.latest()
            raise NotFound(f"no revision {revision}; revisions run from 1 to {newest.revision if newest else 0}")
        return Revision(*row)

    def revisions(self, limit: int = 50) -> list[Revision]:
        """Newest first."""
        with self._lock, self._errors("be read"):
            rows = self._db.execute(
                "SELECT revision, at, document FROM revisions ORDER BY revision DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Revision(*row) for row in rows]

    def _insert_audit(self, audit: AuditDraft, revision_after: int) -> AuditEntry:
        cursor = self._db.execute(
            "INSERT INTO audit (at, actor, action, endpoint, reason, dry_run, revision_before, "
            "revision_after, changes, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                audit.at,
                audit.actor,
                audit.action,
                audit.endpoint,
                audit.reason,
                int(audit.dry_run),
                audit.revision_before,
                revision_after,
                json.dumps(list(audit.changes)),
                json.dumps(audit.detail),
            ),
        )
        return AuditEntry(
            id=int(cursor.lastrowid or 0),
            at=audit.at,
            actor=audit.actor,
            action=audit.action,
            endpoint=audit.endpoint,
            reason=audit.reason,
            dry_run=audit.dry_run,
            revision_before=audit.revision_before,
            revision_after=revision_after,
            changes=list(audit.changes),
            detail=dict(audit.detail),
        )

    def commit(self, expected_revision: int, document: str, audit: AuditDraft) -> tuple[Revision, AuditEntry]:
        """Compare-and-swap the next revision and its audit entry in one transaction."""
        with self._lock, self._errors("be written"):
            swap = pending_swap()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._check_fence()
                (newest,) = self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM revisions").fetchone()
                if newest != expected_revision:
                    raise Conflict(
                        f"the routes changed meanwhile (revision {newest}, expected {expected_revision}); "
                        "look at the new routes and retry"
                    )
                written = self._swap(swap) if swap is not None else 0
                revision = Revision(newest + 1, audit.at, document)
                self._db.execute(
                    "INSERT INTO revisions (revision, at, document) VALUES (?, ?, ?)",
                    (revision.revision, revision.at, revision.document),
                )
                entry = self._insert_audit(audit, revision.revision)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if swap is not None:
            swap.written = written
        return revision, entry

    def append_audit(self, audit: AuditDraft) -> AuditEntry:
        """An entry that changes no state."""
        with self._lock, self._errors("be written"), self._fenced_write(carry_swap=True):
            return self._insert_audit(audit, audit.revision_before)

    def audit(self, endpoint: str | None = None, limit: int = 100, before_id: int = 0) -> list[AuditEntry]:
        """Newest first; with `before_id`, only entries older than it."""
        query = f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE id < ?"
        params: tuple[Any, ...] = (min(before_id, 1 << 62) if before_id > 0 else 1 << 62,)
        if endpoint:
            query += " AND endpoint = ?"
            params = (*params, endpoint)
        query += " ORDER BY id DESC LIMIT ?"
        with self._lock, self._errors("be read"):
            rows = self._db.execute(query, (*params, limit)).fetchall()
        return [_entry(row) for row in rows]

    def put_record(self, kind: str, key: str, body: str, at: float) -> None:
        """Insert or replace one record."""
        with self._lock, self._errors("be written"), self._fenced_write():
            self._db.execute(
                "INSERT INTO records (kind, key, at, body) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, key) DO UPDATE SET at = excluded.at, body = excluded.body, "
                "version = records.version + 1",
                (kind, key, at, body),
            )

    def commit_record(
        self, kind: str, key: str, body: str, at: float, audit: AuditDraft, *, version: int
    ) -> AuditEntry:
        """Swap a record (if still at `version`) and append its audit entry in one transaction."""
        with self._lock, self._errors("be written"), self._transaction():
            self._check_fence()
            self._swap(RecordSwap(kind, key, body, at, version))
            return self._insert_audit(audit, audit.revision_before)

    def create_record(self, kind: str, key: str, body: str, at: float) -> str:
        """Insert a record unless one exists; the stored body."""
        with self._lock, self._errors("be written"):
            self._db.execute(
                "INSERT INTO records (kind, key, at, body) VALUES (?, ?, ?, ?) ON CONFLICT (kind, key) DO NOTHING",
                (kind, key, at, body),
            )
            (stored,) = self._db.execute("SELECT body FROM records WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return str(stored)

    def read_record(self, kind: str, key: str) -> tuple[str, int] | None:
        """One record's body and version."""
        with self._lock, self._errors("be read"):
            row = self._db.execute(
                "SELECT body, version FROM records WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    def swap_record(self, kind: str, key: str, body: str, at: float, version: int) -> int:
        """Write a record if it is still at `version` (checked in the write's transaction); the new version."""
        swap = RecordSwap(kind, key, body, at, version)
        with self._lock, self._errors("be written"), self._transaction():
            self._check_fence()
            written = self._swap(swap)
        swap.written = written
        return written

    def _swap(self, swap: RecordSwap) -> int:
        """Compare the record's version and write it (inside a transaction); its new version."""
        row = self._db.execute(
            "SELECT version FROM records WHERE kind = ? AND key = ?", (swap.kind, swap.key)
        ).fetchone()
        found = int(row[0]) if row else 0
        if found != swap.version:
            raise record_changed(swap, found)
        self._db.execute(
            "INSERT INTO records (kind, key, at, body, version) VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, key) "
            "DO UPDATE SET at = excluded.at, body = excluded.body, version = excluded.version",
            (swap.kind, swap.key, swap.at, swap.body, found + 1),
        )
        return found + 1

    def get_record(self, kind: str, key: str) -> str | None:
        """One record's body."""
        with self._lock, self._errors("be read"):
            row = self._db.execute("SELECT body FROM records WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return row[0] if row else None

    def list_records(self, kind: str, limit: int = 100) -> list[tuple[str, float, str]]:
        """Newest first."""
        with self._lock, self._errors("be read"):
            rows = self._db.execute(
                "SELECT key, at, body FROM records WHERE kind = ? ORDER BY at DESC LIMIT ?", (kind, limit)
            ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    # --- the fleet ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error); call with the lock held."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _fenced_write(self, *, carry_swap: bool = False) -> Iterator[None]:
        """A single write, in a transaction that checks the fence when there is one; call with the lock held.

        With `carry_swap`, a pending record swap (`swapping`) commits in the same transaction.
        """
        swap = pending_swap() if carry_swap else None
        if current_fence() is None and swap is None:
            yield
            return
        with self._transaction():
            self._check_fence()
            written = self._swap(swap) if swap is not None else 0
            yield
        if swap is not None:
            swap.written = written

    def _check_fence(self) -> None:
        fence = current_fence()
        if fence is None:
            return
        lock, member = fence
        holder = self._holder(lock)
        if holder != member:
            raise lock_lost(lock, member, holder)

    def _holder(self, lock: str) -> str:
        """The live holder of a lock ("" when none); call with the lock held."""
        row = self._db.execute(
            "SELECT l.holder FROM locks l JOIN members m ON m.id = l.holder WHERE l.name = ? AND m.expires_at > ?",
            (lock, self._clock()),
        ).fetchone()
        return str(row[0]) if row else ""

    def join(self, member: str, body: str, ttl: float) -> None:
        """Insert (or refresh) the member's row; rows dead for an hour are removed."""
        now = self._clock()
        with self._lock, self._errors("be written"), self._transaction():
            self._db.execute("DELETE FROM members WHERE expires_at < ?", (now - 3600,))
            self._db.execute(
                "INSERT INTO members (id, body, ttl, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET body = excluded.body, ttl = excluded.ttl, "
                "expires_at = excluded.expires_at",
                (member, body, ttl, now + ttl),
            )

    def renew(self, member: str) -> bool:
        """Push the expiry of a live member one ttl further."""
        now = self._clock()
        with self._lock, self._errors("be written"):
            cursor = self._db.execute(
                "UPDATE members SET expires_at = ? + ttl WHERE id = ? AND expires_at > ?", (now, member, now)
            )
        return cursor.rowcount == 1

    def leave(self, member: str) -> None:
        """Delete the member and its locks."""
        with self._lock, self._errors("be written"), self._transaction():
            self._db.execute("DELETE FROM locks WHERE holder = ?", (member,))
            self._db.execute("DELETE FROM members WHERE id = ?", (member,))

    def members(self) -> list[tuple[str, str]]:
        """Live members by id."""
        with self._lock, self._errors("be read"):
            rows = self._db.execute(
                "SELECT id, body FROM members WHERE expires_at > ? ORDER BY id", (self._clock(),)
            ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def acquire(self, lock: str, member: str) -> str:
        """Take the lock when nobody live holds it and `member` is live; the holder."""
        with self._lock, self._errors("be written"), self._transaction():
            holder = self._holder(lock)
            if holder:
                return holder
            live = self._db.execute(
                "SELECT 1 FROM members WHERE id = ? AND expires_at > ?", (member, self._clock())
            ).fetchone()
            if not live:
                return ""
            self._db.execute(
                "INSERT INTO locks (name, holder) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder",
                (lock, member),
            )
            return member

    def wait_for_change(self, after: int, timeout: float, stop: threading.Event) -> list[Revision]:
        """Poll `PRAGMA data_version` until a revision newer than `after` exists, `timeout` passes or `stop` is set."""
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            try:
                with self._lock:
                    (version,) = self._db.execute("PRAGMA data_version").fetchone()
                    if version != seen:
                        rows = self._db.execute(
                            "SELECT revision, at, document FROM revisions WHERE revision > ? ORDER BY revision",
                            (after,),
                        ).fetchall()
                        if rows:
                            return [Revision(*row) for row in rows]
                        seen = version
            except sqlite3.Error as err:
                raise StoreUnavailable(f"the state store {self.url} cannot be read: {err}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.wait(min(POLL_SECONDS, remaining)):
                return []

    def wake(self) -> None:
        """Nothing to do: a waiting poll sees `stop` within POLL_SECONDS."""

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()


def _create(path: Path) -> None:
    """A new store file with the schema, appearing at `path` whole (processes starting together agree).

    It is written under a temporary name and linked into place, so another process opening
    `path` at the same moment never sees a half-made (empty) file; when another process linked
    its own first, that one is the store.
    """
    temporary = path.with_name(f".{path.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(temporary), isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # kept in the file: openers need not switch it (an exclusive lock)
            db.executescript(_SCHEMA)
        finally:
            db.close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, which may replace a racing twin
            if not path.exists():
                os.replace(temporary, path)
    except (OSError, sqlite3.Error) as err:
        raise StoreUnavailable(f"store {path} cannot be created: {_why(err)}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
