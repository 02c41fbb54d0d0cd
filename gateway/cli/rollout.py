"""`gateway rollout ...` and `gateway incidents ...`: progressive rollouts and what the guardian did."""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc

from gateway.cli.admin import change_options
from gateway.cli.connect import ENV_ADMIN_TARGET, AdminClient, connection_options
from gateway.cli.output import fail, print_json, rpc_failure, table, when
from gateway.errors import InvalidInput
from gateway.guardrails.rules import parse_duration
from gateway.pb.gateway.v1 import admin_pb2 as pb


def rollout_dict(status: pb.RolloutStatus) -> dict[str, Any]:
    """JSON-ready form of a rollout."""
    return {
        "endpoint": status.endpoint,
        "version": status.version,
        "baseline": status.baseline,
        "status": status.status,
        "steps": list(status.steps),
        "step": status.step_index + 1,
        "share": status.steps[status.step_index] if status.steps else 0,
        "step_seconds": status.step_seconds,
        "step_started_at": status.step_started_at,
        "started_at": status.started_at,
        "started_by": status.started_by,
        "guardrails": list(status.guardrails),
        "at_least": status.at_least,
        "history": [{"at": e.at, "event": e.event} for e in status.history],
        "dry_run": status.dry_run,
    }


def _print_rollout(body: dict[str, Any]) -> None:
    steps = " -> ".join(f"[{s}%]" if i + 1 == body["step"] else f"{s}%" for i, s in enumerate(body["steps"]))
    print(f"rollout of {body['endpoint']} {body['version']} over {body['baseline']}: {body['status']}")
    print(f"  steps: {steps} ({body['step_seconds']:.0f} s each)")
    for rule in body["guardrails"]:
        print(f"  guardrail: {rule}")
    for event in body["history"]:
        print(f"  {when(event['at'])}  {event['event']}")


def run_rollout(args: argparse.Namespace) -> int:
    """Dispatch a rollout subcommand."""
    client = AdminClient(args)
    try:
        if args.rollout_command == "start":
            try:
                steps = [int(s) for s in args.steps.split(",")]
                step_seconds = parse_duration(args.step_duration, bare_seconds=True)
            except ValueError as err:
                return fail(f"{err}", 2)
            except InvalidInput as err:
                return fail(f"--step-duration: {err.message}", 2)
            status = client.call(
                "StartRollout",
                pb.StartRolloutRequest(
                    endpoint=args.endpoint,
                    version=args.version,
                    steps=steps,
                    step_seconds=step_seconds,
                    guardrails=args.guardrail,
                    at_least=args.at_least,
                    reason=args.reason,
                    dry_run=args.dry_run,
                ),
            )
        else:
            method = {
                "status": "GetRollout",
                "pause": "PauseRollout",
                "resume": "ResumeRollout",
                "abort": "AbortRollout",
            }
            reason = getattr(args, "reason", "") or ""
            status = client.call(method[args.rollout_command], pb.RolloutRequest(endpoint=args.endpoint, reason=reason))
    except grpc.RpcError as err:
        return rpc_failure(err, client.target, ENV_ADMIN_TARGET)
    finally:
        client.close()
    body = rollout_dict(status)
    if getattr(args, "json", False):
        print_json(body)
    else:
        _print_rollout(body)
    return 0


def _verified(record: str) -> str:
    """The check one window after a rollback: pending, healthy, unhealthy, inconclusive (or none)."""
    check = json.loads(record or "{}").get("verification") or {}
    return str(check.get("status", ""))


def run_incidents(args: argparse.Namespace) -> int:
    """List incidents, or show one as a markdown note."""
    client = AdminClient(args)
    try:
        if args.endpoint == "show":
            if not args.id:  # the newest one
                newest = client.call("ListIncidents", pb.ListIncidentsRequest(limit=1)).incidents
                if not newest:
                    return fail("no incidents yet", 1)
                args.id = newest[0].id
            incident = client.call("GetIncident", pb.GetIncidentRequest(id=args.id))
            if getattr(args, "json", False):
                print_json(json.loads(incident.record))
            else:
                print(incident.markdown, end="")
            return 0
        response = client.call("ListIncidents", pb.ListIncidentsRequest(endpoint=args.endpoint or "", limit=args.limit))
    except grpc.RpcError as err:
        return rpc_failure(err, client.target, ENV_ADMIN_TARGET)
    finally:
        client.close()
    if getattr(args, "json", False):
        print_json([json.loads(i.record) for i in response.incidents])
        return 0
    rows = [
        [i.id, when(i.at), i.endpoint, i.candidate, i.action, i.outcome, _verified(i.record), i.summary]
        for i in response.incidents
    ]
    print(table(["ID", "AT", "ENDPOINT", "CANDIDATE", "ACTION", "OUTCOME", "VERIFIED", "WHAT FIRED"], rows))
    return 0


_CONTROLS = (
    ("status", "show the rollout"),
    ("pause", "hold the current step"),
    ("resume", "continue a paused rollout"),
    ("abort", "stop and send traffic back to stable"),
)


def register(commands: Any) -> None:
    """Add `gateway rollout` and `gateway incidents`."""
    common = connection_options()
    mutating = change_options()
    rollout = commands.add_parser("rollout", parents=[common], help="progressive rollouts gated by guardrails")
    rollout.set_defaults(handler=run_rollout)
    sub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ROLLOUT_COMMAND")
    start = sub.add_parser("start", parents=[common, mutating], help="ramp VERSION step by step")
    start.add_argument("endpoint", help="the endpoint, e.g. ctr-ranker")
    start.add_argument("version", help="the loaded version to ramp up")
    start.add_argument("--steps", default="5,25,50,100", help="percent per step (default 5,25,50,100)")
    start.add_argument("--step-duration", default="10m", help="time per step: 90s, 10m, 1h (default 10m)")
    start.add_argument(
        "--guardrail", action="append", default=[], metavar="EXPR", help="rule gating every step (repeat)"
    )
    start.add_argument("--at-least", type=int, default=0, help="act when at least K rules breach")
    for name, text in _CONTROLS:
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("endpoint", help="the endpoint whose rollout this is")
        if name != "status":
            command.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    incidents = commands.add_parser("incidents", parents=[common], help="incidents the guardian recorded")
    incidents.add_argument("endpoint", nargs="?", help="an endpoint, or 'show'")
    incidents.add_argument("id", nargs="?", help="with 'show': the incident id (default: the newest)")
    incidents.add_argument("--limit", type=int, default=50, help="how many, newest first (default 50)")
    incidents.set_defaults(handler=run_incidents)
