"""The read pointer of each endpoint's batch output, and the record of every run.

Runs are recorded when scored and when validated. `publish` moves the pointer only when every
gate passes (or with `force` and a reason, audited). `freeze` stops publishing until
`unfreeze`, keeping consumers on a known-good run: the one they read, when it is known-good,
else the newest known-good one (or a named one). `rollback` repoints to the last known-good
run before the current one (or a named one), marks the one it leaves as rolled back, and
leaves the freeze as it was. A run whose files do not match its manifest is never pointed to.
The pointer and its audit entry commit in one store transaction, so with etcd every replica
sees the same pointer.

Every move is compare-and-swap on the pointer record's version: it commits only if the pointer
is still as the move read it. When another process moved, froze or unfroze it in between,
nothing is written and the move decides again on the pointer as it now is (a publish checks the
freeze and runs its gates against the run published meanwhile), `RACE_TRIES` times at most; a
rollback without a named run is refused instead when the run it meant to roll back was replaced.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from gateway.batch.gates import Gate, Run, evaluate_gates
from gateway.config import BatchGatesConfig
from gateway.errors import Conflict, FailedPrecondition, InvalidInput, NotFound, RecordChanged
from gateway.state import AuditDraft, AuditEntry, StateStore

RUN = "batch-run"
POINTER = "batch-pointer"
_FIRST_PAGE = 1_000
#: How many times a pointer move decides again after another move came between its read and its write.
RACE_TRIES = 5

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Held:
    """An endpoint's pointer as one read found it: a move based on it commits only if it is still so."""

    endpoint: str
    #: The pointer (None: nothing published yet) and its record's version (0: none).
    pointer: Pointer | None
    version: int
    #: The pointer as the first read of this decision found it (it differs once a race was lost).
    first: Pointer | None

    def required(self) -> Pointer:
        """The pointer, or NotFound."""
        if self.pointer is None:
            raise NotFound(f"{self.endpoint} has no published batch run yet")
        return self.pointer


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

    def _read(self, endpoint: str) -> Held:
        """The endpoint's pointer as stored, with its record's version."""
        held = self._store.read_record(POINTER, endpoint)
        pointer = None
        if held is not None:
            data = json.loads(held[0])
            pointer = Pointer(
                endpoint, data["run_id"], Path(data["path"]), data["at"], data["by"], data["reason"], data["frozen"]
            )
        return Held(endpoint, pointer, held[1] if held else 0, pointer)

    def current(self, endpoint: str) -> Pointer:
        """The published run consumers read, or NotFound."""
        return self._read(endpoint).required()

    def _published(self, pointer: Pointer | None) -> Run | None:
        if pointer is None:
            return None
        try:
            return Run.load(pointer.path)
        except NotFound:
            # Its directory is gone: a damaged published run, which `Run.verify` reports and the
            # gates handle, so that a good run can replace it.
            return Run(pointer.path, {"run_id": pointer.run_id})

    def validate(self, endpoint: str, run: Run, settings: BatchGatesConfig) -> list[Gate]:
        """Run every gate against the currently published run; records the results."""
        return self._validate(endpoint, run, settings, self._read(endpoint).pointer)

    def _validate(self, endpoint: str, run: Run, settings: BatchGatesConfig, pointer: Pointer | None) -> list[Gate]:
        """Run every gate against the run `pointer` names; records the results."""
        if run.manifest["endpoint"] != endpoint:
            raise InvalidInput(f"run {run.run_id} was scored for {run.manifest['endpoint']}, not {endpoint}")
        published = self._published(pointer)
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

    def _decide(self, endpoint: str, doing: str, decide: Callable[[Held], T]) -> T:
        """`decide(held)` on the pointer as stored, again on the new pointer each time its move lost a race."""
        held = self._read(endpoint)
        for _ in range(RACE_TRIES):
            try:
                return decide(held)
            except RecordChanged as err:  # another process moved, froze or unfroze it since it was read
                log.info("%s; deciding the %s of %s again on the pointer as it now is", err.message, doing, endpoint)
            held = replace(self._read(endpoint), first=held.first)
        raise Conflict(
            f"the batch pointer of {endpoint} kept changing while this {doing} was decided ({RACE_TRIES} tries; "
            f"nothing was written); `gateway batch history {endpoint}` shows who moves it: retry once it settles"
        )

    def _move(self, actor: str, held: Held, run: Run, action: str, reason: str, *, frozen: bool) -> Pointer:
        """Point consumers at `run` if the pointer is still as `held` read it, with its audit entry.

        RecordChanged (nothing written) when another move came first.
        """
        run.verify()  # never point at files that differ from their manifest
        now = self._clock()
        endpoint = held.endpoint
        pointer = Pointer(endpoint, run.run_id, run.path.resolve(), now, actor, reason, frozen)
        body = {"run_id": run.run_id, "path": str(pointer.path), "at": now, "by": actor, "reason": reason,
                "frozen": frozen}  # fmt: skip
        before = held.pointer.run_id if held.pointer else None
        audit = AuditDraft(
            at=now,
            actor=actor,
            action=action,
            endpoint=endpoint,
            reason=reason,
            dry_run=False,
            revision_before=0,
            changes=[{"path": f"{endpoint} batch pointer", "before": before, "after": run.run_id}],
            detail={"path": str(pointer.path), "frozen": frozen},
        )
        self._store.commit_record(POINTER, endpoint, json.dumps(body), now, audit, version=held.version)
        return pointer

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
        """Validate, then move the pointer if every gate passed (or `force`, with a reason).

        When another move lands between the read and the write, it decides again on the new
        pointer: refused when that is frozen, the gates run against the run it names.
        """
        gates_against: dict[str, list[Gate]] = {}  # by the run they compared with: a retry reuses them

        def decide(held: Held) -> tuple[list[Gate], bool]:
            pointer = held.pointer
            if pointer is not None and pointer.frozen:
                raise _frozen(pointer, meanwhile=held.first is None or not held.first.frozen)
            against = pointer.run_id if pointer else ""
            if against not in gates_against:
                gates_against[against] = self._validate(endpoint, run, settings, pointer)
            gates = gates_against[against]
            failed = [g for g in gates if not g.passed]
            if any(g.name == "files_intact" for g in failed):
                raise FailedPrecondition(f"{run.run_id}: {failed[0].detail}")
            if failed and not force:
                listed = "; ".join(g.refusal() for g in failed)
                raise FailedPrecondition(f"{run.run_id} failed its gates: {listed}; fix the run, or --force --reason")
            if force and not reason.strip():
                raise InvalidInput("--force needs --reason: forcing past failed gates is audited", field="reason")
            action = "batch-publish-forced" if failed else "batch-publish"
            self._move(actor, held, run, action, reason or "gates passed", frozen=False)
            return gates, bool(failed)

        gates, forced = self._decide(endpoint, "publish", decide)
        record = self.record(endpoint, run.run_id)
        record.status = "forced" if forced else "published"
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

    def _repoint(self, actor: str, held: Held, target: RunRecord, *, action: str, reason: str, frozen: bool) -> Pointer:
        current = held.required()
        pointer = self._move(actor, held, Run.load(Path(target.path)), action, reason, frozen=frozen)
        if current.run_id != target.run_id:
            left = self.record(current.endpoint, current.run_id)
            left.status, left.note = "rolled-back", reason
            self._save(left)
        return pointer

    def freeze(self, actor: str, endpoint: str, *, to: str = "", reason: str) -> Pointer:
        """Stop publishing until `unfreeze`, with consumers on a known-good run.

        The pointer moves to `to` when given; otherwise it stays when the run consumers read is
        known-good, and moves to the newest known-good run when it is not (refused when there
        is none: then name a run). When another move lands first, it decides again on the new pointer.
        """
        _require(reason)

        def decide(held: Held) -> Pointer:
            current = held.required()
            if to:
                target = self.record(endpoint, to)
            elif self.record(endpoint, current.run_id).known_good:
                target = self.record(endpoint, current.run_id)
            else:
                target = self._last_good(endpoint, current.run_id, "freeze")
            return self._repoint(actor, held, target, action="batch-freeze", reason=reason, frozen=True)

        return self._decide(endpoint, "freeze", decide)

    def rollback(self, actor: str, endpoint: str, *, to: str = "", reason: str) -> Pointer:
        """Repoint to `to`, or to the newest known-good run besides the current one; a freeze stays as it was.

        Without `to` it rolls back the run it read: when another move repointed consumers first,
        it is refused (Conflict) rather than rolling back a run the operator did not look at.
        """
        _require(reason)

        def decide(held: Held) -> Pointer:
            current, first = held.required(), held.first
            if not to and first is not None and first.run_id != current.run_id:
                raise Conflict(
                    f"{endpoint}'s batch pointer moved from {first.run_id} to {current.run_id} meanwhile "
                    f"(by {current.by}: {current.reason}); nothing was rolled back; `gateway batch current "
                    f"{endpoint}` shows it: roll back again if {current.run_id} should go too"
                )
            target = self.record(endpoint, to) if to else self._last_good(endpoint, current.run_id, "rollback")
            if target.run_id == current.run_id:
                return current  # consumers already read it: nothing to move, nothing to audit
            return self._repoint(actor, held, target, action="batch-rollback", reason=reason, frozen=current.frozen)

        return self._decide(endpoint, "rollback", decide)

    def unfreeze(self, actor: str, endpoint: str, *, reason: str) -> Pointer:
        """Allow publishing again (the pointer stays where it is, wherever another move put it meanwhile)."""
        _require(reason)

        def decide(held: Held) -> Pointer:
            current = held.required()
            if not current.frozen:
                first = held.first
                by = f" (unfrozen meanwhile by {current.by}: {current.reason})" if first and first.frozen else ""
                raise FailedPrecondition(
                    f"{endpoint} is not frozen{by} (consumers read {current.run_id}); nothing to do"
                )
            return self._move(actor, held, Run.load(current.path), "batch-unfreeze", reason, frozen=False)

        return self._decide(endpoint, "unfreeze", decide)

    def history(self, endpoint: str, limit: int = 100) -> list[AuditEntry]:
        """Who published, rolled back or froze what, newest first."""
        return _newest(lambda n: self._store.audit(endpoint, n), lambda e: e.action.startswith("batch-"), limit)


def _frozen(pointer: Pointer, *, meanwhile: bool) -> FailedPrecondition:
    """The refusal to publish past a freeze, saying who froze it and why."""
    when = "was frozen meanwhile" if meanwhile else "is frozen"
    return FailedPrecondition(
        f"{pointer.endpoint} {when} (by {pointer.by}: {pointer.reason}); nothing was published; "
        f"`gateway batch unfreeze {pointer.endpoint} --reason ...` before publishing"
    )


def _require(reason: str) -> None:
    if not reason.strip():
        raise InvalidInput("reason is required: say why (it goes into the audit log)", field="reason")
