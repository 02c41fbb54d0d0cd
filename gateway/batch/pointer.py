"""The read pointer of each endpoint's batch output, and the record of every run.

Runs are recorded when scored and when validated. `publish` moves the pointer only when every
gate passes (or with `force` and a reason, audited). `freeze` stops publishing until
`unfreeze`, keeping consumers on a known-good run: the one they read, when it is known-good,
else the newest known-good one (or a named one). `rollback` repoints to the last known-good
run before the current one (or a named one), marks the one it leaves as rolled back, and
leaves the freeze as it was. A run whose files do not match its manifest is never pointed to.
The pointer and its audit entry commit in one store transaction, so with etcd every replica
sees the same pointer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.batch.gates import Gate, Run, evaluate_gates
from gateway.config import BatchGatesConfig
from gateway.errors import FailedPrecondition, InvalidInput, NotFound
from gateway.state import AuditDraft, AuditEntry, StateStore

RUN = "batch-run"
POINTER = "batch-pointer"
_FIRST_PAGE = 1_000

T = TypeVar("T")


def _newest(fetch: Callable[[int], list[T]], keep: Callable[[T], bool], want: int | None = None) -> list[T]:
    """The newest items `keep` accepts (`want` of them, or all), from a store that can neither filter nor page.

    Asks `fetch(limit)` for the newest `limit` items, with a larger limit until enough are kept or
    fewer than asked come back (the store has no more).
    """
    limit = _FIRST_PAGE if want is None else max(_FIRST_PAGE, want * 4)
    while True:
        items = fetch(limit)
        kept = [item for item in items if keep(item)]
        if len(items) < limit or (want is not None and len(kept) >= want):
            return kept if want is None else kept[:want]
        limit *= 4


@dataclass
class RunRecord:
    """What the store knows of one run."""

    endpoint: str
    run_id: str
    path: str
    status: str = "scored"  # scored | validated | failed-gates | published | forced | rolled-back
    gates: list[dict[str, Any]] = field(default_factory=list)
    version: str = ""
    rows: int = 0
    scored_at: float = 0.0
    published_by: str = ""
    published_at: float = 0.0
    note: str = ""

    @property
    def known_good(self) -> bool:
        """Published after passing every gate, and never rolled back."""
        return self.status == "published"


@dataclass
class Pointer:
    """Where consumers read an endpoint's predictions."""

    endpoint: str
    run_id: str
    path: Path
    at: float
    by: str
    reason: str
    frozen: bool = False


class BatchPointers:
    """Owns batch run records and read pointers in the store."""

    def __init__(self, store: StateStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    # --- records ---------------------------------------------------------------------------------

    def _key(self, endpoint: str, run_id: str) -> str:
        return f"{endpoint}/{run_id}"

    def record(self, endpoint: str, run_id: str) -> RunRecord:
        """A run's record, or NotFound."""
        body = self._store.get_record(RUN, self._key(endpoint, run_id))
        if body is None:
            raise NotFound(f"{endpoint} has no batch run {run_id!r}; `gateway batch history {endpoint}` lists them")
        return RunRecord(**json.loads(body))

    def _save(self, record: RunRecord) -> None:
        self._store.put_record(
            RUN, self._key(record.endpoint, record.run_id), json.dumps(asdict(record)), self._clock()
        )

    def register(self, run: Run) -> RunRecord:
        """Record a freshly scored run."""
        manifest = run.manifest
        record = RunRecord(
            endpoint=manifest["endpoint"],
            run_id=run.run_id,
            path=str(run.path.resolve()),
            version=manifest["model"]["version"],
            rows=int(manifest["output"]["rows"]),
            scored_at=float(manifest["finished_at"]),
        )
        self._save(record)
        return record

    def runs(self, endpoint: str) -> list[RunRecord]:
        """Every recorded run of an endpoint, newest first."""
        prefix = f"{endpoint}/"
        rows = _newest(lambda limit: self._store.list_records(RUN, limit), lambda row: row[0].startswith(prefix))
        return [RunRecord(**json.loads(body)) for _, _, body in rows]

    def locate(self, endpoint: str, run: str, output_root: Path | None = None) -> Run:
        """A run by id (from the store, or under `output_root`) or by path."""
        candidate = Path(run)
        if candidate.is_dir():
            return Run.load(candidate)
        body = self._store.get_record(RUN, self._key(endpoint, run))
        if body is not None:
            return Run.load(Path(json.loads(body)["path"]))
        if output_root is not None:
            return Run.load(output_root / endpoint / run)
        raise NotFound(f"{endpoint} has no batch run {run!r}; give its directory or --output-root")

    # --- the pointer -----------------------------------------------------------------------------

    def current(self, endpoint: str) -> Pointer:
        """The published run consumers read, or NotFound."""
        body = self._store.get_record(POINTER, endpoint)
        if body is None:
            raise NotFound(f"{endpoint} has no published batch run yet")
        data = json.loads(body)
        return Pointer(
            endpoint, data["run_id"], Path(data["path"]), data["at"], data["by"], data["reason"], data["frozen"]
        )

    def _published(self, endpoint: str) -> Run | None:
        try:
            pointer = self.current(endpoint)
        except NotFound:
            return None
        try:
            return Run.load(pointer.path)
        except NotFound:
            # Its directory is gone: a damaged published run, which `Run.verify` reports and the
            # gates handle, so that a good run can replace it.
            return Run(pointer.path, {"run_id": pointer.run_id})

    def validate(self, endpoint: str, run: Run, settings: BatchGatesConfig) -> list[Gate]:
        """Run every gate against the currently published run; records the results."""
        if run.manifest["endpoint"] != endpoint:
            raise InvalidInput(f"run {run.run_id} was scored for {run.manifest['endpoint']}, not {endpoint}")
        published = self._published(endpoint)
        gates = evaluate_gates(run, published if published and published.run_id != run.run_id else None, settings)
        record = self._record_or_register(endpoint, run)
        if record.status in ("scored", "validated", "failed-gates"):
            record.status = "validated" if all(g.passed for g in gates) else "failed-gates"
        record.gates = [g.to_dict() for g in gates]
        self._save(record)
        return gates

    def _record_or_register(self, endpoint: str, run: Run) -> RunRecord:
        try:
            return self.record(endpoint, run.run_id)
        except NotFound:
            return self.register(run)

    def _move(self, actor: str, endpoint: str, run: Run, action: str, reason: str, *, frozen: bool) -> AuditEntry:
        run.verify()  # never point at files that differ from their manifest
        now = self._clock()
        previous = self._store.get_record(POINTER, endpoint)
        body = {"run_id": run.run_id, "path": str(run.path.resolve()), "at": now, "by": actor, "reason": reason,
                "frozen": frozen}  # fmt: skip
        before = json.loads(previous)["run_id"] if previous else ""
        audit = AuditDraft(
            at=now,
            actor=actor,
            action=action,
            endpoint=endpoint,
            reason=reason,
            dry_run=False,
            revision_before=0,
            changes=[{"path": f"{endpoint} batch pointer", "before": before or None, "after": run.run_id}],
            detail={"path": str(run.path.resolve()), "frozen": frozen},
        )
        return self._store.commit_record(POINTER, endpoint, json.dumps(body), now, audit)

    def publish(
        self,
        actor: str,
        endpoint: str,
        run: Run,
        settings: BatchGatesConfig,
        *,
        force: bool = False,
        reason: str = "",
    ) -> list[Gate]:
        """Validate, then move the pointer if every gate passed (or `force`, with a reason)."""
        try:
            if self.current(endpoint).frozen:
                raise FailedPrecondition(
                    f"{endpoint} is frozen; `gateway batch unfreeze {endpoint} --reason ...` before publishing"
                )
        except NotFound:
            pass
        gates = self.validate(endpoint, run, settings)
        failed = [g for g in gates if not g.passed]
        if any(g.name == "files_intact" for g in failed):
            raise FailedPrecondition(f"{run.run_id}: {failed[0].detail}")
        if failed and not force:
            listed = "; ".join(g.refusal() for g in failed)
            raise FailedPrecondition(f"{run.run_id} failed its gates: {listed}; fix the run, or --force --reason")
        if force and not reason.strip():
            raise InvalidInput("--force needs --reason: forcing past failed gates is audited", field="reason")
        action = "batch-publish-forced" if failed else "batch-publish"
        self._move(actor, endpoint, run, action, reason or "gates passed", frozen=False)
        record = self.record(endpoint, run.run_id)
        record.status = "forced" if failed else "published"
        record.published_by, record.published_at = actor, self._clock()
        record.note = reason
        self._save(record)
        return gates

    def _last_good(self, endpoint: str, besides: str, command: str) -> RunRecord:
        good = [r for r in self.runs(endpoint) if r.known_good and r.run_id != besides]
        if not good:
            raise FailedPrecondition(
                f"{endpoint} has no known-good run besides {besides} to go back to; name one: "
                f"`gateway batch {command} {endpoint} --to RUN` (`gateway batch history {endpoint}` lists runs)"
            )
        return max(good, key=lambda r: r.published_at)

    def _repoint(
        self, actor: str, current: Pointer, target: RunRecord, *, action: str, reason: str, frozen: bool
    ) -> Pointer:
        endpoint = current.endpoint
        self._move(actor, endpoint, Run.load(Path(target.path)), action, reason, frozen=frozen)
        if current.run_id != target.run_id:
            left = self.record(endpoint, current.run_id)
            left.status, left.note = "rolled-back", reason
            self._save(left)
        return self.current(endpoint)

    def freeze(self, actor: str, endpoint: str, *, to: str = "", reason: str) -> Pointer:
        """Stop publishing until `unfreeze`, with consumers on a known-good run.

        The pointer moves to `to` when given; otherwise it stays when the run consumers read is
        known-good, and moves to the newest known-good run when it is not (refused when there
        is none: then name a run).
        """
        _require(reason)
        current = self.current(endpoint)
        if to:
            target = self.record(endpoint, to)
        elif self.record(endpoint, current.run_id).known_good:
            target = self.record(endpoint, current.run_id)
        else:
            target = self._last_good(endpoint, current.run_id, "freeze")
        return self._repoint(actor, current, target, action="batch-freeze", reason=reason, frozen=True)

    def rollback(self, actor: str, endpoint: str, *, to: str = "", reason: str) -> Pointer:
        """Repoint to `to`, or to the newest known-good run besides the current one; a freeze stays as it was."""
        _require(reason)
        current = self.current(endpoint)
        target = self.record(endpoint, to) if to else self._last_good(endpoint, current.run_id, "rollback")
        if target.run_id == current.run_id:
            return current  # consumers already read it: nothing to move, nothing to audit
        return self._repoint(actor, current, target, action="batch-rollback", reason=reason, frozen=current.frozen)

    def unfreeze(self, actor: str, endpoint: str, *, reason: str) -> Pointer:
        """Allow publishing again (the pointer stays where it is)."""
        _require(reason)
        current = self.current(endpoint)
        if not current.frozen:
            raise FailedPrecondition(f"{endpoint} is not frozen (consumers read {current.run_id}); nothing to do")
        self._move(actor, endpoint, Run.load(current.path), "batch-unfreeze", reason, frozen=False)
        return self.current(endpoint)

    def history(self, endpoint: str, limit: int = 100) -> list[AuditEntry]:
        """Who published, rolled back or froze what, newest first."""
        return _newest(lambda n: self._store.audit(endpoint, n), lambda e: e.action.startswith("batch-"), limit)


def _require(reason: str) -> None:
    if not reason.strip():
        raise InvalidInput("reason is required: say why (it goes into the audit log)", field="reason")
