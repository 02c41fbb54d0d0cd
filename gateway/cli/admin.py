"""`gateway admin ...`: inspect and change routes through the authenticated Admin API.

Connection options (`--target`, `--token`, env `GATEWAY_ADMIN_TARGET` / `GATEWAY_ADMIN_TOKEN`)
are shared with the other operator commands (`rollout`, `incidents`, `report`, `runbook`)
through `gateway/cli/connect.py`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from gateway.cli import execution
from gateway.cli.connect import ENV_ADMIN_TARGET, AdminClient, connection_options
from gateway.cli.output import fail, print_json, rpc_failure, sorted_map, table, when
from gateway.guardrails.rules import RuleSet
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.routing import format_traffic


def change_options() -> argparse.ArgumentParser:
    """`--reason` (required) and `--dry-run`, for every mutating command."""
    mutating = argparse.ArgumentParser(add_help=False)
    mutating.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    mutating.add_argument("--dry-run", action="store_true", help="validate and show the diff; change nothing")
    return mutating


def _json_value(text: str) -> Any:
    return json.loads(text) if text else None


def _changes_json(changes: Any) -> list[dict[str, Any]]:
    return [{"path": c.path, "before": _json_value(c.before), "after": _json_value(c.after)} for c in changes]


def _print_change(response: pb.ChangeResponse, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "revision": response.revision,
                "dry_run": response.dry_run,
                "audit_id": response.audit_id,
                "message": response.message,
                "changes": _changes_json(response.changes),
            }
        )
        return
    if response.dry_run:
        print(f"dry run against revision {response.revision}: nothing changed")
    elif response.changes:
        print(f"revision {response.revision}")
    else:
        print(f"revision {response.revision}: {response.message or 'no change'}")
    for change in response.changes:
        before = change.before or "(none)"
        after = change.after or "(none)"
        print(f"  {change.path}: {before} -> {after}")


def _routes_document(routes: pb.Routes) -> dict[str, Any]:
    document: dict[str, Any] = {"revision": routes.revision, "committed_at": routes.committed_at}
    if routes.HasField("store"):
        store = routes.store
        document["store"] = {"url": store.url, "connected": store.connected, "since": store.since}
        document["store"] |= {"error": store.error} if store.error else {}
        document["process"] = routes.process
    if routes.HasField("fleet"):
        document["fleet"] = MessageToDict(routes.fleet, preserving_proto_field_name=True)
    return document


def _fleet_line(fleet: pb.FleetStatus) -> str:
    leader = next((m.process for m in fleet.members if m.id == fleet.leader), "none")
    mine = " (this process)" if fleet.leader == fleet.member else ""
    return f"fleet: {len(fleet.members)} live process(es); guardian leader: {leader}{mine}"


def _print_routes(routes: pb.Routes, as_json: bool) -> None:
    endpoints: list[dict[str, Any]] = [
        {
            "name": e.name,
            "versions": list(e.versions),
            "traffic": sorted_map(e.traffic),
            "labels": sorted_map(e.labels),
            "max_batch_size": e.max_batch_size,
            "nan_policy": e.nan_policy,
            "shadows": sorted_map(e.shadows),
            "faults": sorted_map(e.faults),
            "guardrails": list(e.guardrails),
            "guardrails_at_least": e.guardrails_at_least,
            "guardrails_observe_only": e.guardrails_observe_only,
            **execution.to_json(e),
        }
        for e in routes.endpoints
    ]
    store = routes.store if routes.HasField("store") else None
    if as_json:
        print_json({**_routes_document(routes), "endpoints": endpoints})
        return
    print(f"revision {routes.revision} (committed {when(routes.committed_at)})")
    if store is not None:
        state = "connected" if store.connected else f"DISCONNECTED since {when(store.since)}: {store.error}"
        print(f"store {store.url}: {state} (answered by {routes.process})")
        if not store.connected:
            print("  serving the last routes this process saw; changes are refused until the store is back")
    if routes.HasField("fleet"):
        print(_fleet_line(routes.fleet))
    rows = []
    for e in endpoints:
        for version in e["versions"]:
            labels = ", ".join(sorted(k for k, v in e["labels"].items() if v == version))
            extra = []
            if e["shadows"].get(version):
                extra.append(f"shadow {e['shadows'][version]}%")
            if e["faults"].get(version):
                extra.append(f"FAULT {e['faults'][version]}")
            rows.append([e["name"], version, f"{e['traffic'].get(version, 0)}%", labels, ", ".join(extra)])
    print(table(["ENDPOINT", "VERSION", "TRAFFIC", "LABELS", "NOTES"], rows))
    for e in endpoints:
        for rule in e["guardrails"]:
            print(f"guardrail {e['name']}: {rule}")
        for line in execution.lines(e["name"], e):
            print(line)


# --- subcommands ---------------------------------------------------------------------------


def _routes(client: AdminClient, args: argparse.Namespace) -> pb.Routes:
    routes: pb.Routes = client.call(
        "GetRoutes", pb.GetRoutesRequest(endpoint=args.endpoint or "", revision=args.revision)
    )
    return routes


def _revisions(client: AdminClient, args: argparse.Namespace) -> None:
    response = client.call("ListRevisions", pb.ListRevisionsRequest(limit=args.limit))
    if args.json:
        print_json(
            [
                {
                    "revision": r.revision,
                    "committed_at": r.committed_at,
                    "traffic": {e.name: sorted_map(e.traffic) for e in r.endpoints},
                }
                for r in response.revisions
            ]
        )
        return
    rows = [
        [
            r.revision,
            when(r.committed_at),
            "; ".join(f"{e.name} {format_traffic(e.traffic)}" for e in r.endpoints),
        ]
        for r in response.revisions
    ]
    print(table(["REVISION", "COMMITTED", "TRAFFIC"], rows))


def _versions(client: AdminClient, args: argparse.Namespace) -> None:
    response = client.call("ListVersions", pb.ListVersionsRequest(endpoint=args.endpoint or ""))
    if args.json:
        print_json(
            [
                {
                    "endpoint": v.endpoint,
                    "version": v.version,
                    "state": v.state,
                    "traffic": v.traffic,
                    "labels": list(v.labels),
                    "sha256": v.sha256,
                    "path": v.path,
                    "loaded_at": v.loaded_at,
                    "load_seconds": v.load_seconds,
                    "error": v.error,
                }
                for v in response.versions
            ]
        )
        return
    rows = [
        [
            v.endpoint,
            v.version,
            v.state + (f" ({v.error})" if v.error else ""),
            f"{v.traffic}%",
            ", ".join(v.labels),
            v.sha256[:12],
            when(v.loaded_at),
        ]
        for v in response.versions
    ]
    print(table(["ENDPOINT", "VERSION", "STATE", "TRAFFIC", "LABELS", "SHA256", "LOADED"], rows))


def _weights(pairs: list[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not weight.strip().lstrip("-").isdigit():
            raise ValueError(f"{pair!r} is not VERSION=WEIGHT (an integer percent), e.g. 1.13=25")
        weights[version.strip()] = int(weight)
    return weights


def _audit(client: AdminClient, args: argparse.Namespace) -> None:
    response = client.call("GetAudit", pb.GetAuditRequest(endpoint=args.endpoint or "", limit=args.limit))
    if args.json:
        print_json(
            [
                {
                    "id": e.id,
                    "at": e.at,
                    "actor": e.actor,
                    "action": e.action,
                    "endpoint": e.endpoint,
                    "reason": e.reason,
                    "dry_run": e.dry_run,
                    "revision_before": e.revision_before,
                    "revision_after": e.revision_after,
                    "changes": _changes_json(e.changes),
                    "detail": json.loads(e.detail or "{}"),
                }
                for e in response.entries
            ]
        )
        return
    rows = []
    for e in response.entries:
        revision = (
            f"{e.revision_before}->{e.revision_after}"
            if e.revision_after != e.revision_before
            else str(e.revision_before)
        )
        shown = e.changes[:3]
        changes = "; ".join(f"{c.path}: {c.before or '(none)'} -> {c.after or '(none)'}" for c in shown)
        if len(e.changes) > 3:
            changes += f"; ... {len(e.changes) - 3} more (--json shows all)"
        rows.append(
            [
                e.id,
                when(e.at),
                e.actor,
                e.action + (" (dry run)" if e.dry_run else ""),
                e.endpoint,
                revision,
                e.reason,
                changes,
            ]
        )
    print(table(["ID", "AT", "WHO", "ACTION", "ENDPOINT", "REVISION", "REASON", "CHANGES"], rows))


def _mutation(args: argparse.Namespace) -> tuple[str, Any]:
    """The RPC and request for a mutating subcommand."""
    common = {"reason": args.reason, "dry_run": args.dry_run}
    builders: dict[str, Callable[[], tuple[str, Any]]] = {
        "set-traffic": lambda: (
            "SetTraffic",
            pb.SetTrafficRequest(endpoint=args.endpoint, weights=_weights(args.weights), **common),
        ),
        "label": lambda: (
            "SetLabel",
            pb.SetLabelRequest(
                endpoint=args.endpoint, label=args.label, version="" if args.remove else args.version, **common
            ),
        ),
        "promote": lambda: ("Promote", pb.PromoteRequest(endpoint=args.endpoint, **common)),
        "rollback": lambda: (
            "Rollback",
            pb.RollbackRequest(
                endpoint=args.endpoint, to_version=args.to or "", to_revision=args.to_revision or 0, **common
            ),
        ),
        "switch": lambda: (
            "Switch",
            pb.SwitchRequest(endpoint=args.endpoint, version=args.version, **common),
        ),
        "load": lambda: (
            "LoadVersion",
            pb.LoadVersionRequest(
                endpoint=args.endpoint, version=args.version, path=args.path, sha256=args.sha256, **common
            ),
        ),
        "unload": lambda: (
            "UnloadVersion",
            pb.UnloadVersionRequest(endpoint=args.endpoint, version=args.version, **common),
        ),
        "shadow": lambda: (
            "SetShadow",
            pb.SetShadowRequest(
                endpoint=args.endpoint,
                version=args.version,
                percent=0 if args.off else args.percent,
                **common,
            ),
        ),
        "guardrails": lambda: (
            "SetGuardrails",
            pb.SetGuardrailsRequest(
                endpoint=args.endpoint,
                rules=[] if args.clear else args.guardrail,
                at_least=args.at_least,
                observe_only=args.observe_only,
                **common,
            ),
        ),
        "fault": lambda: (
            "SetFault",
            pb.SetFaultRequest(
                endpoint=args.endpoint,
                version=args.version,
                error_rate=args.error_rate,
                latency_ms=args.latency_ms,
                clear=args.clear,
                **common,
            ),
        ),
        "apply": lambda: (
            "Apply",
            pb.ApplyRequest(document=Path(args.file).read_text(), source=str(args.file), **common),
        ),
        **execution.mutations(args, common),
    }
    return builders[args.admin_command]()


def _usage_problem(args: argparse.Namespace) -> str:
    """What is missing from a command line argparse cannot check (empty when nothing)."""
    command = args.admin_command
    if command == "guardrails" and not args.guardrail and not args.clear:
        return "give at least one --guardrail EXPR, or --clear"
    if command == "fault" and not (args.clear or args.error_rate or args.latency_ms):
        return "give --error-rate and/or --latency-ms, or --clear"
    if command == "shadow" and args.percent is None and not args.off:
        return "give --percent P (1..100) or --off"
    if command == "label" and not args.version and not args.remove:
        return "give the VERSION the label should point at, or --remove to delete the label"
    if command == "label" and args.version and args.remove:
        return f"--remove deletes the label: give no VERSION (got {args.version!r})"
    return ""


def _explain_rules(args: argparse.Namespace) -> None:
    """Each rule as the guardian reads it (the server accepted them, so they parse)."""
    print("the guardian reads these rules as:")
    for line in RuleSet.parse(args.guardrail, args.at_least, args.observe_only).describe():
        print(f"  {line}")


def run(args: argparse.Namespace) -> int:
    """Dispatch one admin subcommand."""
    args.json = getattr(args, "json", False)
    problem = _usage_problem(args) or execution.usage_problem(args)
    if problem:
        return fail(problem, 2)
    try:
        mutation = _mutation(args) if hasattr(args, "reason") else None
    except (OSError, ValueError) as err:
        return fail(str(err), 2)
    client = AdminClient(args)
    try:
        if mutation is not None:
            method, request = mutation
            _print_change(client.call(method, request), args.json)
            if args.admin_command == "guardrails" and not args.json and not args.clear:
                _explain_rules(args)
        elif args.admin_command == "routes":
            _print_routes(_routes(client, args), args.json)
        elif args.admin_command == "revisions":
            _revisions(client, args)
        elif args.admin_command == "versions":
            _versions(client, args)
        elif args.admin_command == "audit":
            _audit(client, args)
    except grpc.RpcError as err:
        return rpc_failure(err, client.target, ENV_ADMIN_TARGET)
    finally:
        client.close()
    return 0


_ENDPOINT = "the endpoint, e.g. ctr-ranker"


def register(commands: Any) -> None:
    """Add `gateway admin` and its subcommands."""
    common = connection_options()
    mutating = change_options()
    admin = commands.add_parser("admin", parents=[common], help="inspect and change routes (authenticated)")
    admin.set_defaults(handler=run)
    sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")

    _register_reads(sub, common)
    _register_changes(sub, common, mutating)


def _register_reads(sub: Any, common: argparse.ArgumentParser) -> None:
    routes = sub.add_parser("routes", parents=[common], help="show routes (current or an earlier revision)")
    routes.add_argument("endpoint", nargs="?", help="one endpoint (default: all)")
    routes.add_argument("--revision", type=int, default=0, help="an earlier route revision (default: the current)")
    revisions = sub.add_parser("revisions", parents=[common], help="route history, newest first")
    revisions.add_argument("--limit", type=int, default=20, help="how many, newest first (default 20)")
    versions = sub.add_parser("versions", parents=[common], help="loaded versions: state, digest, traffic")
    versions.add_argument("endpoint", nargs="?", help="one endpoint (default: all)")
    audit = sub.add_parser("audit", parents=[common], help="the audit log, newest first")
    audit.add_argument("endpoint", nargs="?", help="one endpoint (default: all)")
    audit.add_argument("--limit", type=int, default=50, help="how many entries, newest first (default 50)")


def _register_changes(sub: Any, common: argparse.ArgumentParser, mutating: argparse.ArgumentParser) -> None:
    traffic = sub.add_parser("set-traffic", parents=[common, mutating], help="set weights: VERSION=PERCENT ...")
    traffic.add_argument("endpoint", help=_ENDPOINT)
    traffic.add_argument(
        "weights", nargs="+", metavar="VERSION=WEIGHT", help="integer percents summing to 100; others get 0"
    )
    label = sub.add_parser("label", parents=[common, mutating], help="point a label at a version")
    label.add_argument("endpoint", help=_ENDPOINT)
    label.add_argument("label", help="the label: stable, canary, or a name of your own")
    label.add_argument("version", nargs="?", help="the version it points at (omit with --remove)")
    label.add_argument("--remove", action="store_true", help="delete the label")
    promote = sub.add_parser("promote", parents=[common, mutating], help="the canary becomes stable at 100%%")
    promote.add_argument("endpoint", help=_ENDPOINT)
    rollback = sub.add_parser(
        "rollback",
        parents=[common, mutating],
        help="all traffic to stable (or --to VERSION / --to-revision N)",
    )
    rollback.add_argument("endpoint", help=_ENDPOINT)
    target = rollback.add_mutually_exclusive_group()
    target.add_argument("--to", metavar="VERSION", help="send all traffic to this version instead of stable")
    target.add_argument(
        "--to-revision", type=int, metavar="N", help="restore the endpoint's routes as they were at revision N"
    )
    switch = sub.add_parser("switch", parents=[common, mutating], help="blue-green: 100%% to VERSION in one step")
    switch.add_argument("endpoint", help=_ENDPOINT)
    switch.add_argument("version", help="the loaded, ready version that takes 100%%")
    load = sub.add_parser("load", parents=[common, mutating], help="load a new version from under the model root")
    load.add_argument("endpoint", help=_ENDPOINT)
    load.add_argument("version", help="the new version's name, e.g. 1.15")
    load.add_argument("path", help="model file or version directory, relative to the model root")
    load.add_argument("--sha256", required=True, help="the model file's sha256; a file that differs is refused")
    unload = sub.add_parser("unload", parents=[common, mutating], help="unload a version that takes no traffic")
    unload.add_argument("endpoint", help=_ENDPOINT)
    unload.add_argument("version", help="a version without traffic or labels")
    shadow = sub.add_parser(
        "shadow", parents=[common, mutating], help="mirror a share of live requests to a version (or --off)"
    )
    shadow.add_argument("endpoint", help=_ENDPOINT)
    shadow.add_argument("version", help="the version that gets the mirrored copies")
    amount = shadow.add_mutually_exclusive_group()
    amount.add_argument("--percent", type=int, help="percent of live requests mirrored, 1..100")
    amount.add_argument("--off", action="store_true", help="stop mirroring")
    guardrails = sub.add_parser(
        "guardrails", parents=[common, mutating], help="set an endpoint's guardrail rules (or --clear)"
    )
    guardrails.add_argument("endpoint", help=_ENDPOINT)
    guardrails.add_argument(
        "--guardrail", action="append", default=[], metavar="EXPR", help="e.g. 'error_rate > 2%% for 5m' (repeat)"
    )
    guardrails.add_argument("--at-least", type=int, default=1, help="act when at least K rules breach (default 1)")
    guardrails.add_argument("--observe-only", action="store_true", help="record what would fire; never act")
    guardrails.add_argument("--clear", action="store_true", help="remove the guardrails")
    fault = sub.add_parser("fault", parents=[common, mutating], help="inject errors/latency on a version (drills)")
    fault.add_argument("endpoint", help=_ENDPOINT)
    fault.add_argument("version", help="the version the fault applies to")
    fault.add_argument("--error-rate", type=float, default=0.0, help="share of requests failing, 0..1")
    fault.add_argument("--latency-ms", type=float, default=0.0, help="added latency per request")
    fault.add_argument("--clear", action="store_true", help="remove the fault")
    execution.register(sub, common, mutating)
    apply = sub.add_parser("apply", parents=[common, mutating], help="apply a whole route file")
    apply.add_argument("-f", "--file", required=True, help="the route file (YAML) to make true")
