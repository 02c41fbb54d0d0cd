"""`ControlPlane`: the single writer of routes.

Admin RPCs, the CLI, rollouts and the guardian all change traffic through it.

Every change follows the same steps: compute the new desired state from the current one,
validate it (routes compile, versions that gain traffic are ready), diff it; on a dry run
record the diff as a dry-run audit entry and stop; otherwise commit it to the store with
compare-and-swap together with its audit entry, then swap the in-process route table. The
data plane never waits: it keeps reading the old table until the one-attribute swap.

Methods block (store I/O, model loading): call them off the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway import edits
from gateway.desired import Change, DesiredState, diff, endpoint_from_config, parse_route_file
from gateway.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    GatewayError,
    InvalidInput,
    NotFound,
    StoreUnavailable,
)
from gateway.faults import Fault
from gateway.guardrails.rules import RuleSet
from gateway.registry import ModelRegistry, VersionState
from gateway.repository import Artifact
from gateway.routing import VERSION_NAME, Router, RouteTable, labels_on
from gateway.state import AuditDraft, AuditEntry, Revision, StateStore, StoreHealth

log = logging.getLogger(__name__)

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
class VersionInfo:
    """A version as an operator sees it: lifecycle state, artifact, traffic and labels."""

    endpoint: str
    version: str
    state: str
    sha256: str
    path: str
    loaded_at: float
    load_seconds: float
    traffic: int
    labels: list[str] = field(default_factory=list)
    error: str = ""


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


class ControlPlane:
    """Owns the desired state, its durable revisions and audit log, and the route-table swap."""

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

    def versions(self, endpoint: str = "") -> list[VersionInfo]:
        """Every version (of one endpoint, when given) with its state and traffic share."""
        state = self._state
        names = [state.endpoint(endpoint).name] if endpoint else sorted(state.endpoints)
        infos = []
        for name in names:
            ep = state.endpoints[name]
            for version, artifact in ep.artifacts.items():
                try:
                    snapshot = self.registry.get(name, version)
                    status, loaded_at, seconds, error = (
                        snapshot.state.value,
                        snapshot.loaded_at,
                        snapshot.load_seconds,
                        snapshot.error,
                    )
                except NotFound:
                    status, loaded_at, seconds, error = "absent", 0.0, 0.0, "not loaded in this process"
                infos.append(
                    VersionInfo(
                        endpoint=name,
                        version=version,
                        state=status,
                        sha256=artifact.sha256,
                        path=artifact.path,
                        loaded_at=loaded_at,
                        load_seconds=seconds,
                        traffic=ep.weights.get(version, 0),
                        labels=labels_on(version, ep.labels),
                        error=error,
                    )
                )
        return infos

    def routes_at(self, revision: int = 0) -> tuple[int, float, DesiredState]:
        """(revision, committed at, desired state) of a stored revision; 0 means the one being served.

        The one being served comes from memory, so it can be shown while the store is unreachable.
        """
        if not revision or revision == self._revision:
            return self._revision, self._committed_at, self._state
        stored = self.store.get_revision(revision)
        return stored.revision, stored.at, DesiredState.from_json(stored.document)

    def audit(self, endpoint: str = "", limit: int = 100) -> list[AuditEntry]:
        """The audit log, newest first."""
        return self.store.audit(endpoint or None, limit)

    def revisions(self, limit: int = 50) -> list[Revision]:
        """Route revisions, newest first."""
        return self.store.revisions(limit)

    # --- changes --------------------------------------------------------------------------

    def set_traffic(
        self,
        actor: str,
        endpoint: str,
        weights: Mapping[str, int],
        *,
        reason: str,
        dry_run: bool = False,
        labels: Mapping[str, str] | None = None,
        trigger: str = "manual",
    ) -> ChangeResult:
        """Replace an endpoint's weights (integer percent summing to 100; unnamed versions get 0).

        `labels`, when given, are set in the same revision (a rollout's step names its canary).
        """
        detail = {"weights": dict(weights)}
        intent = Intent(actor, "set-traffic", endpoint, reason, dry_run, detail, trigger)
        return self._change(intent, edits.set_weights(weights, labels))

    def note(self, intent: Intent) -> AuditEntry:
        """Record an event that changes no route (a rollout started, paused, aborted) in the audit log."""
        self._check_reason(intent.reason)
        return self.store.append_audit(self._draft(intent, self._revision, []))

    def set_label(
        self, actor: str, endpoint: str, label: str, version: str, *, reason: str, dry_run: bool = False
    ) -> ChangeResult:
        """Point a label at a version; an empty version removes the label."""
        intent = Intent(actor, "label", endpoint, reason, dry_run, {"label": label, "version": version})
        return self._change(intent, edits.set_label(label, version))

    def set_shadow(
        self, actor: str, endpoint: str, version: str, percent: int, *, reason: str, dry_run: bool = False
    ) -> ChangeResult:
        """Mirror `percent` of the endpoint's live requests to `version` (0 turns the shadow off)."""
        intent = Intent(actor, "shadow", endpoint, reason, dry_run, {"version": version, "percent": percent})
        return self._change(intent, edits.set_shadow(version, percent))

    def set_guardrails(
        self,
        actor: str,
        endpoint: str,
        rules: list[str],
        *,
        at_least: int = 1,
        observe_only: bool = False,
        reason: str,
        dry_run: bool = False,
    ) -> ChangeResult:
        """Replace an endpoint's guardrail rules (an empty list removes them)."""
        rule_set = RuleSet.parse(rules, at_least if rules else 1, observe_only)
        if self.history_seconds:
            rule_set.check_history(self.history_seconds)
        detail = {"rules": rules, "at_least": at_least, "observe_only": observe_only}
        return self._change(
            Intent(actor, "guardrails", endpoint, reason, dry_run, detail), edits.set_guardrails(rule_set)
        )

    def set_fault(
        self,
        actor: str,
        endpoint: str,
        version: str,
        fault: Fault | None,
        *,
        reason: str,
        dry_run: bool = False,
    ) -> ChangeResult:
        """Inject (or with None, clear) errors and latency on a version, for drills."""
        detail = {"version": version, **(fault.to_dict() if fault else {"cleared": True})}
        return self._change(Intent(actor, "fault", endpoint, reason, dry_run, detail), edits.set_fault(version, fault))

    def promote(
        self, actor: str, endpoint: str, *, reason: str, dry_run: bool = False, trigger: str = "manual"
    ) -> ChangeResult:
        """The canary becomes stable and takes 100%; the canary label is cleared."""
        return self._change(Intent(actor, "promote", endpoint, reason, dry_run, trigger=trigger), edits.promote)

    def switch(self, actor: str, endpoint: str, version: str, *, reason: str, dry_run: bool = False) -> ChangeResult:
        """Blue-green: 100% to `version` in one revision, after a readiness check and a warm-up run.

        The version is labelled `canary` so `promote` makes it stable and `rollback` returns
        to stable in one revision.
        """
        self._state.endpoint(endpoint).require_version(version)
        self._require_ready(endpoint, version)
        if not dry_run:
            self.registry.runnable(endpoint, version).warm_up()
        intent = Intent(actor, "switch", endpoint, reason, dry_run, {"version": version})
        return self._change(intent, edits.switch_to(version))

    def rollback(
        self,
        actor: str,
        endpoint: str,
        *,
        reason: str,
        to_version: str = "",
        to_revision: int = 0,
        dry_run: bool = False,
        trigger: str = "manual",
    ) -> ChangeResult:
        """All traffic to `stable` (default), to a named version, or the endpoint as it was at a revision."""
        if to_version and to_revision:
            raise InvalidInput("give either a version or a revision to roll back to, not both")
        if not to_revision:
            intent = Intent(actor, "rollback", endpoint, reason, dry_run, {"to_version": to_version}, trigger)
            return self._change(intent, edits.all_traffic_to(to_version))
        if to_revision >= self._revision:
            raise InvalidInput(f"revision {to_revision} is not earlier than the current revision {self._revision}")
        past = DesiredState.from_json(self.store.get_revision(to_revision).document).endpoints.get(endpoint)
        if past is None:
            raise NotFound(f"{endpoint} did not exist at revision {to_revision}")
        intent = Intent(actor, "rollback", endpoint, reason, dry_run, {"to_revision": to_revision}, trigger)
        return self._change(intent, edits.restore(past, to_revision))

    def load_version(
        self,
        actor: str,
        endpoint: str,
        version: str,
        path: str,
        sha256: str,
        *,
        reason: str,
        dry_run: bool = False,
    ) -> ChangeResult:
        """Register, verify, load and warm a new artifact at run time; it takes no traffic yet."""
        current = self._state.endpoint(endpoint)
        if not VERSION_NAME.match(version):
            raise InvalidInput(f"version {version!r} is invalid: letters, digits, '.', '_' or '-'")
        if version in current.artifacts:
            raise FailedPrecondition(
                f"{endpoint} already has version {version} "
                f"(sha256 {current.artifacts[version].sha256[:12]}); "
                "versions are immutable, choose a new version name"
            )
        artifact = self.registry.repository.at_path(endpoint, version, path, sha256)
        intent = Intent(actor, "load", endpoint, reason, dry_run, {"version": version, "path": artifact.path})
        try:
            if not dry_run:
                self.registry.load(artifact, intra_op_threads=current.intra_op_threads)
            return self._change(intent, edits.add_version(artifact))
        except AlreadyExists:
            raise  # a concurrent load of the same version owns the model: leave it alone
        except GatewayError:
            if not dry_run:
                self.registry.unload(endpoint, version)  # a refused artifact is not registered
            raise

    def unload_version(
        self, actor: str, endpoint: str, version: str, *, reason: str, dry_run: bool = False
    ) -> ChangeResult:
        """Forget a version that takes no traffic and no label points at."""
        intent = Intent(actor, "unload", endpoint, reason, dry_run, {"version": version})
        result = self._change(intent, edits.remove_version(version))
        if not dry_run and result.changes:
            self.registry.unload(endpoint, version)
        return result

    def apply(self, actor: str, document: str, *, reason: str, dry_run: bool = False, source: str = "") -> ChangeResult:
        """Make the endpoints of a route file exactly as it says (declarative, like `kubectl apply`).

        Endpoints the file does not mention are left alone. New versions are loaded from
        their manifests before the switch; versions the file drops are unloaded after it.
        """
        config = parse_route_file(document, source=source or "applied route file")
        self._check_reason(reason)
        with self._lock:
            current = self._state
            loaded: list[Artifact] = []
            to_load: set[tuple[str, str]] = set()  # on a dry run: versions the real apply would load
            updated = current
            try:
                for name, endpoint_config in config.endpoints.items():
                    existing = current.endpoints.get(name)
                    artifacts = {}
                    for version in endpoint_config.versions:
                        known = existing.artifacts.get(version) if existing else None
                        artifacts[version] = self._applied_artifact(name, version, known)
                        if not known and not self.registry.is_ready(name, version):
                            if dry_run:
                                to_load.add((name, version))
                            else:
                                fresh = artifacts[version]
                                self.registry.load(fresh, intra_op_threads=endpoint_config.intra_op_threads)
                                loaded.append(fresh)
                    updated = updated.replace_endpoint(endpoint_from_config(name, endpoint_config, artifacts))
                intent = Intent(actor, "apply", ",".join(sorted(config.endpoints)), reason, dry_run)
                result = self._commit(intent, current, updated, assume_ready=to_load)
            except GatewayError:
                for artifact in loaded:
                    self.registry.unload(artifact.endpoint, artifact.version)
                raise
            if not dry_run:
                for name in config.endpoints:
                    before = current.endpoints.get(name)
                    for version in before.versions if before else ():
                        if version not in updated.endpoints[name].artifacts:
                            self.registry.unload(name, version)
        return result

    def _applied_artifact(self, endpoint: str, version: str, known: Artifact | None) -> Artifact:
        """The artifact a route file's version names: the one on record, checked against its manifest."""
        repository = self.registry.repository
        if known and not repository.has_manifest(endpoint, version):
            return known  # loaded by path (LoadVersion): its record is the truth
        fresh = repository.from_manifest(endpoint, version)
        if known and known.sha256 != fresh.sha256:
            raise FailedPrecondition(
                f"{endpoint} {version} is loaded with sha256 {known.sha256[:12]}, but its manifest now records "
                f"{fresh.sha256[:12]}; versions are immutable, use a new version name"
            )
        return known or fresh

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
