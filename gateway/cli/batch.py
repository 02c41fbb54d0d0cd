"""`gateway batch ...`: score a table, validate, publish behind a read pointer, freeze, roll back.

The batch machinery (pyarrow, onnxruntime) is imported when a batch command runs, not when
`gateway` starts: every other command stays quick to start.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.output import fail, print_json, shown, table, when
from gateway.errors import FailedPrecondition, GatewayError
from gateway.state import DEFAULT_STORE_URL

if TYPE_CHECKING:
    from gateway.batch.gates import Gate
    from gateway.batch.pointer import BatchPointers
    from gateway.config import BatchGatesConfig
    from gateway.repository import Artifact, ModelRepository
    from gateway.state import StateStore

DEFAULT_CONFIG = "models/gateway.yaml"
DEFAULT_OUTPUT = "var/batch"


def _artifact(store: StateStore, repository: ModelRepository, endpoint: str, version: str) -> Artifact:
    """The version's artifact as the store registered it, else from its manifest under the model root."""
    from gateway.desired import DesiredState

    latest = store.latest()
    if latest is not None:
        state = DesiredState.from_json(latest.document).endpoints.get(endpoint)
        if state is not None and version in state.artifacts:
            return state.artifacts[version]
    return repository.from_manifest(endpoint, version)


def _settings(args: argparse.Namespace, endpoint: str) -> BatchGatesConfig:
    from gateway.config import BatchGatesConfig, load_config

    config = load_config(Path(args.config))
    gates = config.endpoints[endpoint].batch_gates if endpoint in config.endpoints else BatchGatesConfig()
    overrides = {k: v for k, v in (("ks_max", args.ks_max), ("mean_shift_max", args.mean_shift_max)) if v is not None}
    return gates.overridden("command line", **overrides)


def _print_gates(gates: list[Gate]) -> None:
    rows = [[g.name, g.shown(), g.shown(threshold=True), "pass" if g.passed else "FAIL", g.detail] for g in gates]
    print(table(["GATE", "VALUE", "THRESHOLD", "RESULT", "DETAIL"], rows))


def _score(args: argparse.Namespace, store: StateStore, pointers: BatchPointers) -> int:
    from gateway.batch.gates import Run
    from gateway.batch.score import ScoreRequest, score
    from gateway.config import load_config
    from gateway.repository import ModelRepository

    config = load_config(Path(args.config))
    repository = ModelRepository(config.model_root)
    request = ScoreRequest(
        endpoint=args.endpoint,
        version=args.version,
        artifact=_artifact(store, repository, args.endpoint, args.version),
        input_path=Path(args.input),
        output_root=Path(args.output_root),
        run_id=args.run_id or "",
        columns=args.columns.split(",") if args.columns else (),
        keep_columns=args.keep_columns.split(",") if args.keep_columns else (),
        chunk_rows=args.chunk_rows,
        progress=not args.json and sys.stderr.isatty(),
    )
    result = score(request, repository)
    pointers.register(Run.load(result.path))
    if args.json:
        print_json(
            {"run_id": result.run_id, "path": str(result.path), "rows": result.rows, "manifest": result.manifest}
        )
    else:
        rate = result.rows / max(result.seconds, 1e-9)
        print(
            f"run {result.run_id}: {result.rows:,} rows in {result.seconds:.1f} s ({rate:,.0f} rows/s) -> {result.path}"
        )
        summary = result.manifest["score_summary"]
        print(f"  scores: mean {shown(summary.get('mean'), '.4g')}, p50 {shown(summary.get('p50'), '.4g')}")
    return 0


def _gates(args: argparse.Namespace, pointers: BatchPointers, *, publish: bool) -> int:
    from gateway.batch.gates import Gate

    run = pointers.locate(args.endpoint, args.run, Path(args.output_root))
    settings = _settings(args, args.endpoint)
    if publish:
        try:
            gates = pointers.publish(
                args.actor, args.endpoint, run, settings, force=args.force, reason=args.reason or ""
            )
        except FailedPrecondition as err:
            if not args.json and "failed its gates" in err.message:  # the refusal names them; the table shows all
                _print_gates([Gate(**g) for g in pointers.record(args.endpoint, run.run_id).gates])
            raise
    else:
        gates = pointers.validate(args.endpoint, run, settings)
    if args.json:
        print_json(
            {"run_id": run.run_id, "gates": [g.to_dict() for g in gates], "passed": all(g.passed for g in gates)}
        )
    else:
        _print_gates(gates)
        if publish:
            print(f"published {run.run_id}: consumers now read {run.path.resolve()}")
    return 0 if publish or all(g.passed for g in gates) else 1


def _pointer(args: argparse.Namespace, pointers: BatchPointers) -> int:
    command = args.batch_command
    before = pointers.current(args.endpoint)
    if command == "current":
        pointer = before
    elif command == "unfreeze":
        pointer = pointers.unfreeze(args.actor, args.endpoint, reason=args.reason)
    elif command == "freeze":
        pointer = pointers.freeze(args.actor, args.endpoint, to=args.to or "", reason=args.reason)
    else:
        pointer = pointers.rollback(args.actor, args.endpoint, to=args.to or "", reason=args.reason)
    body = {"endpoint": pointer.endpoint, "run_id": pointer.run_id, "path": str(pointer.path), "frozen": pointer.frozen,
            "previous_run_id": before.run_id, "at": pointer.at, "by": pointer.by, "reason": pointer.reason}  # fmt: skip
    if args.json:
        print_json(body)
        return 0
    state = "frozen: publishing refused until unfreeze" if pointer.frozen else "publishing allowed"
    if command == "current":
        print(f"{pointer.endpoint} reads {pointer.run_id} ({state}) at {pointer.path}")
    elif before.run_id != pointer.run_id:
        print(f"{pointer.endpoint}: consumers moved from {before.run_id} to {pointer.run_id} ({state})")
    else:
        print(f"{pointer.endpoint}: consumers stay on {pointer.run_id} ({state})")
    return 0


def _change(changes: Sequence[dict[str, Any]]) -> str:
    return f"{shown(changes[0]['before'])} -> {shown(changes[0]['after'])}" if changes else ""


def _history(args: argparse.Namespace, pointers: BatchPointers) -> int:
    runs = pointers.runs(args.endpoint)
    events = pointers.history(args.endpoint)
    if args.json:
        print_json({"runs": [r.__dict__ for r in runs], "events": [e.__dict__ for e in events]})
        return 0
    rows = [
        [r.run_id, r.version, r.rows, when(r.scored_at), r.status,
         ", ".join(f"{g['name']}:{'ok' if g['passed'] else 'FAIL'}" for g in r.gates), r.published_by]
        for r in sorted(runs, key=lambda r: r.scored_at, reverse=True)
    ]  # fmt: skip
    print(table(["RUN", "VERSION", "ROWS", "SCORED", "STATUS", "GATES", "PUBLISHED BY"], rows))
    if events:
        print()
        rows = [[when(e.at), e.actor, e.action, _change(e.changes), e.reason] for e in events]
        print(table(["AT", "WHO", "ACTION", "CHANGE", "REASON"], rows))
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch a batch subcommand."""
    from gateway.batch.pointer import BatchPointers
    from gateway.state import open_store

    try:
        store = open_store(args.store)
    except GatewayError as err:
        return fail(err.message, 2)
    pointers = BatchPointers(store)
    command = args.batch_command
    try:
        if command == "score":
            return _score(args, store, pointers)
        if command in ("validate", "publish"):
            return _gates(args, pointers, publish=command == "publish")
        return _history(args, pointers) if command == "history" else _pointer(args, pointers)
    except GatewayError as err:
        return fail(f"{err.code.name}: {err.message}")
    except (OSError, json.JSONDecodeError) as err:
        return fail(str(err))
    finally:
        store.close()


_ENDPOINT = "the endpoint, e.g. ctr-ranker"
_REASON = "why (recorded in the audit log)"


def register(commands: Any) -> None:
    """Add `gateway batch` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=DEFAULT_STORE_URL, help=f"state store URL (default {DEFAULT_STORE_URL})")
    common.add_argument("--config", default=DEFAULT_CONFIG, help="route file: model root and per-endpoint batch_gates")
    common.add_argument("--output-root", default=DEFAULT_OUTPUT, help=f"where runs live (default {DEFAULT_OUTPUT})")
    common.add_argument("--actor", default="batch", help="who this is, for the audit log (default batch)")
    common.add_argument("--json", action="store_true", help="print strict JSON instead of text")
    batch = commands.add_parser("batch", help="batch predictions behind a read pointer")
    batch.set_defaults(handler=run)
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")

    scorer = sub.add_parser("score", parents=[common], help="score a Parquet or CSV table into a new run")
    scorer.add_argument("endpoint", help=_ENDPOINT)
    scorer.add_argument("--version", required=True, help="the model version that scores")
    scorer.add_argument("--input", required=True, help=".parquet or .csv")
    scorer.add_argument("--run-id", help="default: the UTC time")
    scorer.add_argument("--columns", help="comma-separated feature columns, in the model's order")
    scorer.add_argument("--keep-columns", help="columns copied to the output (ids for joins)")
    scorer.add_argument("--chunk-rows", type=int, default=65_536, help="rows per chunk (bounds memory)")

    for name, text in (("validate", "run the gates; non-zero exit on a failure"),
                       ("publish", "run the gates and, if all pass, move the read pointer")):  # fmt: skip
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("endpoint", help=_ENDPOINT)
        command.add_argument("run", help="a run id or a run directory")
        command.add_argument("--ks-max", type=float, help="override the KS gate")
        command.add_argument(
            "--mean-shift-max", type=float, help="override the mean-shift gate (a share of the published mean)"
        )
        if name == "publish":
            command.add_argument("--force", action="store_true", help="publish despite failed gates (needs --reason)")
            command.add_argument("--reason", default="", help="why (recorded in the audit log; required with --force)")

    current = sub.add_parser("current", parents=[common], help="the published run and its path")
    current.add_argument("endpoint", help=_ENDPOINT)
    freeze = sub.add_parser(
        "freeze", parents=[common], help="stop publishing; consumers stay on (or go back to) a known-good run"
    )
    freeze.add_argument("endpoint", help=_ENDPOINT)
    freeze.add_argument("--to", metavar="RUN", help="the run consumers read while frozen (default: a known-good one)")
    freeze.add_argument("--reason", required=True, help=_REASON)
    unfreeze = sub.add_parser("unfreeze", parents=[common], help="allow publishing again")
    unfreeze.add_argument("endpoint", help=_ENDPOINT)
    unfreeze.add_argument("--reason", required=True, help=_REASON)
    rollback = sub.add_parser(
        "rollback", parents=[common], help="repoint to the last known-good run (or --to RUN); a freeze stays"
    )
    rollback.add_argument("endpoint", help=_ENDPOINT)
    rollback.add_argument("--to", metavar="RUN", help="the run to go back to (default: the last known-good one)")
    rollback.add_argument("--reason", required=True, help=_REASON)
    history = sub.add_parser("history", parents=[common], help="runs, their gates, and who published what")
    history.add_argument("endpoint", help=_ENDPOINT)
