"""`ControlPlane`: the single writer of routes.

Admin RPCs, the CLI, rollouts and the guardian all change traffic through it.

Every change follows the same steps: compute the new desired state from the current one,
validate it (routes compile, versions that gain traffic are ready), diff it; on a dry run
record the diff as a dry-run audit entry and stop; otherwise commit it to the store with
compare-and-swap together with its audit entry, then swap the in-process route table. The
data plane never waits: it keeps reading the old table until the one-attribute swap. The
commit path, and following other processes' commits, are `RouteReplica` (`replica.py`);
this module holds the commands built on it.

Methods block (store I/O, model loading): call them off the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gateway import edits
from gateway.config import BatchingConfig
from gateway.desired import DesiredState, endpoint_from_config, parse_route_file
from gateway.errors import AlreadyExists, FailedPrecondition, GatewayError, InvalidInput, NotFound, TooLarge
from gateway.faults import Fault
from gateway.guardrails.rules import RuleSet
from gateway.limits import MAX_PATH_CHARS, check_rules, check_text
from gateway.replica import SYSTEM_ACTOR, ChangeResult, Intent, RouteReplica
from gateway.repository import Artifact
from gateway.routing import VERSION_NAME, labels_on

__all__ = ["MAX_CONCURRENT_LOADS", "SYSTEM_ACTOR", "ChangeResult", "ControlPlane", "Intent", "VersionInfo"]

#: Model loads (LoadVersion, Apply) running at once; the admin listener's other workers stay free
#: for rollbacks and reads however many loads are asked for.
MAX_CONCURRENT_LOADS = 2


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


class ControlPlane(RouteReplica):
    """The single writer of routes: every operator-facing change, validated, through one commit path.

    Admin RPCs, the CLI, rollouts and the guardian all change traffic through it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loads = threading.BoundedSemaphore(MAX_CONCURRENT_LOADS)

    @contextmanager
    def _load_slot(self) -> Iterator[None]:
        """One of MAX_CONCURRENT_LOADS; refused at once (RESOURCE_EXHAUSTED) rather than queued."""
        if not self._loads.acquire(blocking=False):
            raise TooLarge(f"{MAX_CONCURRENT_LOADS} model loads are in progress; retry when one has finished")
        try:
            yield
        finally:
            self._loads.release()

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

    def past_shadows(self, endpoint: str, limit: int = 1000) -> set[str]:
        """Versions that were shadows of `endpoint` at any of the newest `limit` revisions."""
        found: set[str] = set()
        for revision in self.revisions(limit):
            state = DesiredState.from_json(revision.document).endpoints.get(endpoint)
            if state is not None:
                found.update(state.shadows)
        return found

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
        check_rules(rules)
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

    def set_batching(
        self, actor: str, endpoint: str, batching: BatchingConfig | None, *, reason: str, dry_run: bool = False
    ) -> ChangeResult:
        """Merge concurrent requests to one version into one run (None turns batching off)."""
        detail = {"batching": batching.model_dump(mode="json") if batching else None}
        intent = Intent(actor, "batching", endpoint, reason, dry_run, detail)
        return self._change(intent, edits.set_batching(batching))

    def set_runner(self, actor: str, endpoint: str, runner: str, *, reason: str, dry_run: bool = False) -> ChangeResult:
        """Where the endpoint's model runs happen: auto (by measured cost), inline or pool."""
        return self._change(
            Intent(actor, "runner", endpoint, reason, dry_run, {"runner": runner}), edits.set_runner(runner)
        )

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
        self._fresh()
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
        self._fresh()
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
        self._fresh()
        check_text(path, "path", MAX_PATH_CHARS)
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
        if dry_run:
            self.registry.repository.verify(artifact)  # a dry run checks size and digest too
            return self._change(intent, edits.add_version(artifact))
        with self._load_slot():
            try:
                self.registry.load(artifact, intra_op_threads=current.intra_op_threads)
                return self._change(intent, edits.add_version(artifact))
            except AlreadyExists:
                raise  # a concurrent load of the same version owns the model: leave it alone
            except GatewayError:
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
            self._fresh()
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
                                with self._load_slot():
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
