"""`gateway batch ...`: score a table, validate, publish behind a read pointer, freeze, roll back."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.batch.gates import Gate, Run
from gateway.batch.pointer import BatchPointers
from gateway.batch.score import ScoreRequest, score
from gateway.cli.output import fail, print_json, table, when
from gateway.config import BatchGatesConfig, load_config
from gateway.desired import DesiredState
from gateway.errors import GatewayError
from gateway.repository import Artifact, ModelRepository
from gateway.state import DEFAULT_STORE_URL, StateStore, open_store

DEFAULT_CONFIG = "models/gateway.yaml"
DEFAULT_OUTPUT = "var/batch"


def _artifact(store: StateStore, repository: ModelRepository, endpoint: str, version: str) -> Artifact:
    """The version's artifact as the store registered it, else from its manifest under the model root."""
    latest = store.latest()
    if latest is not None:
        state = DesiredState.from_json(latest.document).endpoints.get(endpoint)
        if state is not None and version in state.artifacts:
            return state.artifacts[version]
    return repository.from_manifest(endpoint, version)


def _settings(args: argparse.Namespace, endpoint: str) -> BatchGatesConfig:
    config = load_config(Path(args.config))
    gates = config.endpoints[endpoint].batch_gates if endpoint in config.endpoints else BatchGatesConfig()
    overrides = {k: v for k, v in (("ks_max", args.ks_max), ("mean_shift_max", args.mean_shift_max)) if v is not None}
    return gates.overridden("command line", **overrides)


def _print_gates(gates: list[Gate]) -> None:
    rows = [[g.name, g.shown(), g.shown(threshold=True), "pass" if g.passed else "FAIL", g.detail] for g in gates]
    print(table(["GATE", "VALUE", "THRESHOLD", "RESULT", "DETAIL"], rows))


def _score(args: argparse.Namespace, store: StateStore, pointers: BatchPointers) -> int:
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
        print(f"  scores: mean {summary.get('mean', float('nan')):.4g}, p50 {summary.get('p50', float('nan')):.4g}")
    return 0


def _gates(args: argparse.Namespace, pointers: BatchPointers, *, publish: bool) -> int:
    run = pointers.locate(args.endpoint, args.run, Path(args.output_root))
    settings = _settings(args, args.endpoint)
    if publish:
        gates = pointers.publish(args.actor, args.endpoint, run, settings, force=args.force, reason=args.reason or "")
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
    if command == "current":
        pointer = pointers.current(args.endpoint)
    elif command == "unfreeze":
        pointer = pointers.unfreeze(args.actor, args.endpoint, reason=args.reason)
    else:
        pointer = pointers.rollback(
            args.actor, args.endpoint, to=getattr(args, "to", "") or "", reason=args.reason, freeze=command == "freeze"
        )
    body = {"endpoint": pointer.endpoint, "run_id": pointer.run_id, "path": str(pointer.path), "frozen": pointer.frozen,
            "at": pointer.at, "by": pointer.by, "reason": pointer.reason}  # fmt: skip
    if args.json:
        print_json(body)
    else:
        state = " (frozen)" if pointer.frozen else ""
        print(f"{pointer.endpoint}: {pointer.run_id}{state} -> {pointer.path}")
    return 0


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
        print(table(["AT", "WHO", "ACTION", "CHANGE", "REASON"], [
            [when(e.at), e.actor, e.action, f"{e.changes[0]['before']} -> {e.changes[0]['after']}" if e.changes else "",
             e.reason] for e in events
        ]))  # fmt: skip
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch a batch subcommand."""
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


def register(commands: Any) -> None:
    """Add `gateway batch` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=DEFAULT_STORE_URL, help=f"state store URL (default {DEFAULT_STORE_URL})")
    common.add_argument("--config", default=DEFAULT_CONFIG, help="route file: model root and per-endpoint batch_gates")
    common.add_argument("--output-root", default=DEFAULT_OUTPUT, help=f"where runs live (default {DEFAULT_OUTPUT})")
    common.add_argument("--actor", default="batch", help="who this is, for the audit log (default batch)")
    common.add_argument("--json", action="store_true")
    batch = commands.add_parser("batch", help="batch predictions behind a read pointer")
    batch.set_defaults(handler=run)
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")

    scorer = sub.add_parser("score", parents=[common], help="score a Parquet or CSV table into a new run")
    scorer.add_argument("endpoint")
    scorer.add_argument("--version", required=True)
    scorer.add_argument("--input", required=True, help=".parquet or .csv")
    scorer.add_argument("--run-id", help="default: the UTC time")
    scorer.add_argument("--columns", help="comma-separated feature columns, in the model's order")
    scorer.add_argument("--keep-columns", help="columns copied to the output (ids for joins)")
    scorer.add_argument("--chunk-rows", type=int, default=65_536, help="rows per chunk (bounds memory)")

    for name, text in (("validate", "run the gates; non-zero exit on a failure"),
                       ("publish", "run the gates and, if all pass, move the read pointer")):  # fmt: skip
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("endpoint")
        command.add_argument("run", help="a run id or a run directory")
        command.add_argument("--ks-max", type=float, help="override the KS gate")
        command.add_argument("--mean-shift-max", type=float, help="override the mean-shift gate")
        if name == "publish":
            command.add_argument("--force", action="store_true", help="publish despite failed gates (needs --reason)")
            command.add_argument("--reason", default="")

    current = sub.add_parser("current", parents=[common], help="the published run and its path")
    current.add_argument("endpoint")
    freeze = sub.add_parser("freeze", parents=[common], help="repoint to the last known-good run and stop publishing")
    freeze.add_argument("endpoint")
    freeze.add_argument("--reason", required=True)
    unfreeze = sub.add_parser("unfreeze", parents=[common], help="allow publishing again")
    unfreeze.add_argument("endpoint")
    unfreeze.add_argument("--reason", required=True)
    rollback = sub.add_parser("rollback", parents=[common], help="repoint to the last known-good run (or --to RUN)")
    rollback.add_argument("endpoint")
    rollback.add_argument("--to", help="a run id")
    rollback.add_argument("--reason", required=True)
    history = sub.add_parser("history", parents=[common], help="runs, their gates, and who published what")
    history.add_argument("endpoint")
