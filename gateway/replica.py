"""`RouteReplica`: this process's copy of the desired state, and the one way it changes.

It restores the newest revision from the store (or seeds an empty store), commits each
change with compare-and-swap together with its audit entry, then swaps the in-process route
table; and it installs revisions other processes commit (`follow`, driven by the
`StoreFollower`). Before a change is computed it catches up with the store, so a change
through any process builds on the newest state; a store that cannot be reached refuses the
change by name while the routes keep serving (fail static).

The operator-facing commands live in `ControlPlane` (`gateway/control.py`), built on this.
Methods block (store I/O, model loading): call them off the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway import edits
from gateway.desired import Change, DesiredState, diff
from gateway.errors import Conflict, FailedPrecondition, GatewayError, InvalidInput, NotFound, StoreUnavailable
from gateway.registry import ModelRegistry, VersionState
from gateway.routing import Router, RouteTable
from gateway.state import AuditDraft, AuditEntry, Revision, StateStore, StoreHealth

log = logging.getLogger("gateway.control")

SYSTEM_ACTOR = "system"


@dataclass(frozen=True)
class ChangeResult:
    """What a mutating call did (or, on a dry run, would do)."""

    revision: int
    dry_run: bool
    changes: list[Change]
    audit_id: int
    message: str = ""


@dataclass(frozen=True)
class Intent:
    """Who asks for which change, why, and whether only to see its diff."""

    actor: str
    action: str
    endpoint: str
    reason: str
    dry_run: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    #: What asked: `manual` (an operator or pipeline), `guardrail`, `rollout`, `system`.
    trigger: str = "manual"


_T = TypeVar("_T")
Listener = Callable[[int, DesiredState], None]
CommitListener = Callable[[Intent, int], None]


class RouteReplica:
    """Owns the desired state this process serves, its durable revisions and audit log, and the route-table swap."""

    def __init__(
        self,
        store: StateStore,
        registry: ModelRegistry,
        router: Router,
        *,
        clock: Callable[[], float] = time.time,
        history_seconds: int = 0,
    ) -> None:
        self.store = store
        #: Seconds of traffic history the windows keep: guardrail windows may not look further back.
        self.history_seconds = history_seconds
        self.registry = registry
        self.router = router
        self._clock = clock
        self._lock = threading.RLock()
        self._state = DesiredState({})
        self._revision = 0
        self._committed_at = 0.0
        #: Whether this process reaches the store; every store call here reports to it.
        self.health = StoreHealth(store.url, clock=clock)
        self._listeners: list[Listener] = []
        self._commit_listeners: list[CommitListener] = []

    # --- lifecycle ------------------------------------------------------------------------

    def on_change(self, listener: Listener) -> None:
        """Call `listener(revision, state)` after every committed change (and at start)."""
        self._listeners.append(listener)

    def on_commit(self, listener: CommitListener) -> None:
        """Call `listener(intent, revision)` after every committed change (not dry runs, not no-ops)."""
        self._commit_listeners.append(listener)

    def start(self, seed: Callable[[], DesiredState], *, seed_source: str) -> Revision:
        """Restore the newest committed revision, or seed an empty store; then load every version.

        `seed` is only called when the store is empty: after that the store is the truth.
        """
        latest = self.store.latest()
        seeded = False
        if latest is None:
            state = seed()
            state.route_table(1)  # validate before anything is written
            try:
                latest, _ = self.store.commit(
                    0,
                    state.to_json(),
                    self._draft(
                        Intent(SYSTEM_ACTOR, "seed", ",".join(sorted(state.endpoints)), f"seeded from {seed_source}"),
                        0,
                        diff(DesiredState({}), state),
                    ),
                )
                seeded = True
                log.info("seeded the store %s from %s (revision 1)", self.store.url, seed_source)
            except Conflict:  # another process sharing the store seeded it first: its state is the truth
                latest = self.store.latest()
                assert latest is not None
        if not seeded:
            log.info("restoring revision %d from %s", latest.revision, self.store.url)
        state = DesiredState.from_json(latest.document)
        self._load_all(state)
        with self._lock:
            self._install(latest.revision, state, committed_at=latest.at)
        return latest

    def _load_all(self, state: DesiredState) -> None:
        for endpoint, artifact in state.artifacts():
            if self.registry.is_ready(endpoint.name, artifact.version):
                continue
            try:
                self.registry.load(artifact, intra_op_threads=endpoint.intra_op_threads)
            except GatewayError as err:
                if endpoint.weights.get(artifact.version, 0) > 0:
                    raise  # a version that takes traffic must load, or the start fails
                log.error("%s %s failed to load and takes no traffic: %s", endpoint.name, artifact.version, err)

    def _install(
        self, revision: int, state: DesiredState, table: RouteTable | None = None, *, committed_at: float
    ) -> None:
        if table is None or table.revision != revision:
            table = state.route_table(revision)
        self._state, self._revision, self._committed_at = state, revision, committed_at
        self.router.swap(table)
        for listener in self._listeners:
            listener(revision, state)

    # --- reads ----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision the data plane is serving."""
        return self._revision

    @property
    def state(self) -> DesiredState:
        """The desired state of the current revision."""
        return self._state

    def routes_at(self, revision: int = 0) -> tuple[int, float, DesiredState]:
        """(revision, committed at, desired state) of a stored revision; 0 means the one being served.

        The one being served comes from memory, so it can be shown while the store is unreachable.
        """
        if not revision or revision == self._revision:
            return self._revision, self._committed_at, self._state
        stored = self.store.get_revision(revision)
        return stored.revision, stored.at, DesiredState.from_json(stored.document)

    def audit(self, endpoint: str = "", limit: int = 100, before_id: int = 0) -> list[AuditEntry]:
        """The audit log, newest first (older than `before_id` when given)."""
        return self.store.audit(endpoint or None, limit, before_id)

    def revisions(self, limit: int = 50) -> list[Revision]:
        """Route revisions, newest first."""
        return self.store.revisions(limit)

    def note(self, intent: Intent) -> AuditEntry:
        """Record an event that changes no route (a rollout started, paused, aborted) in the audit log."""
        self._check_reason(intent.reason)
        return self.store.append_audit(self._draft(intent, self._revision, []))

    # --- the one way a change happens -------------------------------------------------------

    @staticmethod
    def _check_reason(reason: str) -> None:
        if not reason.strip():
            raise InvalidInput("reason is required: say why (it goes into the audit log)", field="reason")

    def _require_ready(self, endpoint: str, version: str) -> None:
        try:
            snapshot = self.registry.get(endpoint, version)
        except NotFound:
            raise FailedPrecondition(f"{endpoint} {version} is not loaded in this gateway") from None
        if snapshot.state is not VersionState.READY:
            detail = f" ({snapshot.error})" if snapshot.error else ""
            raise FailedPrecondition(
                f"{endpoint} {version} is {snapshot.state.value}, not ready; it cannot take traffic{detail}"
            )

    def _change(self, intent: Intent, edit: edits.Edit) -> ChangeResult:
        self._check_reason(intent.reason)
        with self._lock:
            self._fresh()
            current = self._state
            return self._commit(intent, current, current.update(intent.endpoint, edit))

    def _commit(
        self,
        intent: Intent,
        current: DesiredState,
        updated: DesiredState,
        *,
        assume_ready: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
    ) -> ChangeResult:
        table = updated.route_table(self._revision + 1)  # validates: raises InvalidInput naming the field
        for name, ep in updated.endpoints.items():
            before = current.endpoints.get(name)
            # Live traffic and mirrored traffic are checked apart: a shadow may have failed to load.
            for share, had in (
                (ep.weights, before.weights if before else {}),
                (ep.shadows, before.shadows if before else {}),
            ):
                for version, percent in share.items():
                    if percent > had.get(version, 0) and (name, version) not in assume_ready:
                        self._require_ready(name, version)
        changes = diff(current, updated)
        draft = self._draft(intent, self._revision, changes)
        if intent.dry_run:
            entry = self._reaching_store(lambda: self.store.append_audit(draft))
            return ChangeResult(self._revision, True, changes, entry.id, "dry run: nothing changed")
        if not changes:
            return ChangeResult(self._revision, False, [], 0, "no change: the routes are already like that")
        try:
            revision, entry = self._reaching_store(lambda: self.store.commit(self._revision, updated.to_json(), draft))
        except Conflict:
            self._catch_up()  # another writer committed first: serve its revision, so a retry can succeed
            raise
        self._install(revision.revision, updated, table, committed_at=revision.at)
        for listener in self._commit_listeners:
            listener(intent, revision.revision)
        log.info(
            "revision %d: %s %s by %s (%s): %s",
            revision.revision,
            intent.action,
            intent.endpoint,
            intent.actor,
            intent.reason,
            "; ".join(c.render() for c in changes),
        )
        return ChangeResult(revision.revision, False, changes, entry.id)

    def _reaching_store(self, call: Callable[[], _T]) -> _T:
        """Run a store call, reporting whether the store answered; a lost store refuses the change by name."""
        try:
            result = call()
        except StoreUnavailable as err:
            self.health.lost(err.message)
            raise StoreUnavailable(
                f"{err.message}; nothing was changed, and this gateway keeps serving revision {self._revision}"
            ) from None
        self.health.reached()
        return result

    def _fresh(self) -> None:
        """Serve the store's newest revision before a change is computed from it.

        Another process (a worker beside this one, a replica) may have committed a moment
        ago and this one's follower not yet installed it: a change computed from the stale
        state would only fail its compare-and-swap. Raises StoreUnavailable naming the store.
        """
        self._reaching_store(self._catch_up)

    def refresh(self) -> None:
        """Best effort `_fresh` for reads: with the store unreachable, the routes served are shown."""
        with contextlib.suppress(StoreUnavailable):  # fail static: the health says the store is lost
            self._fresh()

    def _catch_up(self) -> None:
        """Install the store's newest revision (written by another gateway sharing the store)."""
        latest = self.store.latest()
        if latest is not None:
            self.follow(latest)

    def follow(self, latest: Revision) -> bool:
        """Serve a revision another process committed, when it is newer than the one served.

        Versions it names that this process lacks are loaded first (the old routes serve
        meanwhile); versions it no longer names are unloaded after the swap. Returns whether
        it was installed: a version that takes traffic and cannot load here keeps this
        process on its current revision (logged), rather than routing to a missing model.
        """
        with self._lock:
            if latest.revision <= self._revision:
                return False
            state = DesiredState.from_json(latest.document)
            try:
                self._load_all(state)
            except GatewayError as err:
                log.error("cannot serve revision %d written by another gateway: %s", latest.revision, err)
                return False
            before = self._state
            self._install(latest.revision, state, committed_at=latest.at)
            for name, endpoint in before.endpoints.items():
                kept = state.endpoints.get(name)
                for version in endpoint.artifacts:
                    if kept is None or version not in kept.artifacts:
                        self.registry.unload(name, version)
        log.info("now serving revision %d, committed by another gateway", latest.revision)
        return True

    def _draft(self, intent: Intent, revision: int, changes: list[Change]) -> AuditDraft:
        return AuditDraft(
            at=self._clock(),
            actor=intent.actor,
            action=intent.action,
            endpoint=intent.endpoint,
            reason=intent.reason,
            dry_run=intent.dry_run,
            revision_before=revision,
            changes=[c.to_dict() for c in changes],
            detail=intent.detail,
        )
