"""`gateway runbook ENDPOINT`: the one-screen runbook of an endpoint, from its live configuration.

Triggers (the guardrail rules, as the guardian applies them), the rollback and rollforward
commands with this endpoint's versions filled in, and how to verify, in that order: what an
on-call engineer needs at 2am. `--markdown` prints it for a wiki page; `--json` for tools.

Rules are rendered from their parsed fields (metric, threshold, window, samples, action) and,
where the rule can say itself in words (`describe`), from that: a new metric needs no edit here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway.cli.connect import ENV_ADMIN_TARGET, AdminClient, connection_options
from gateway.cli.output import MISSING, fail, print_json, rpc_failure, when
from gateway.errors import GatewayError
from gateway.guardrails.rules import Rule, parse_rule
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.routing import STABLE, format_traffic, version_sort_key


def duration(seconds: int) -> str:
    """Seconds as a rule writes them: 30s, 5m, 2h, 1d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def trigger(rule: Rule) -> dict[str, Any]:
    """One rule, as the runbook shows it (generic over metrics)."""
    describe = getattr(rule, "describe", None)
    return {
        "rule": rule.text,
        "metric": rule.metric.value,
        "threshold": rule.threshold,
        "window_seconds": rule.window_seconds,
        "min_samples": rule.min_samples,
        "action": rule.action.value,
        "description": describe() if callable(describe) else "",
    }


@dataclass
class Step:
    """A command to run, and what it does here."""

    command: str
    why: str


@dataclass
class Runbook:
    """What the runbook says, before it is printed as text, markdown or JSON."""

    endpoint: str
    revision: int
    committed_at: float
    traffic: dict[str, int]
    labels: dict[str, str]
    idle: list[str]
    triggers: list[dict[str, Any]]
    at_least: int
    observe_only: bool
    rollout: str
    window: int
    rollback: list[Step] = field(default_factory=list)
    rollforward: list[Step] = field(default_factory=list)
    verify: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        steps = {name: [{"command": s.command, "why": s.why} for s in getattr(self, name)]
                 for name in ("rollback", "rollforward", "verify")}  # fmt: skip
        return {
            "endpoint": self.endpoint,
            "revision": self.revision,
            "committed_at": self.committed_at,
            "traffic": self.traffic,
            "labels": self.labels,
            "idle_versions": self.idle,
            "rollout": self.rollout or None,
            "triggers": self.triggers,
            "at_least": self.at_least,
            "observe_only": self.observe_only,
            "verify_window_seconds": self.window,
            **steps,
        }


def _previous(endpoint: str, revisions: pb.ListRevisionsResponse, now: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The newest earlier revision whose traffic for `endpoint` differs from now (0 when none)."""
    for revision in revisions.revisions:
        for routes in revision.endpoints:
            if routes.name == endpoint and dict(routes.traffic) != now:
                return int(revision.revision), dict(routes.traffic)
    return 0, {}


def build(
    routes: pb.Routes,
    versions: pb.ListVersionsResponse,
    revisions: pb.ListRevisionsResponse,
    rollout: pb.RolloutStatus | None,
) -> Runbook:
    """The runbook of the one endpoint in `routes`."""
    (ep,) = routes.endpoints
    name = ep.name
    traffic = {v: ep.traffic[v] for v in sorted(ep.traffic, key=version_sort_key) if ep.traffic[v]}
    labels = {k: ep.labels[k] for k in sorted(ep.labels)}
    stable = labels.get(STABLE, "")
    idle = sorted((v.version for v in versions.versions if v.state == "ready" and not ep.traffic.get(v.version)),
                  key=version_sort_key)  # fmt: skip
    rules = [parse_rule(text) for text in ep.guardrails]
    window = max((r.window_seconds for r in rules), default=300)
    active = rollout is not None and rollout.status in ("running", "paused")
    book = Runbook(
        endpoint=name,
        revision=int(routes.revision),
        committed_at=routes.committed_at,
        traffic=traffic,
        labels=labels,
        idle=idle,
        triggers=[trigger(r) for r in rules],
        at_least=int(ep.guardrails_at_least),
        observe_only=ep.guardrails_observe_only,
        rollout=(f"{rollout.version} {rollout.status} at {rollout.steps[rollout.step_index]}% "
                 f"(step {rollout.step_index + 1} of {len(rollout.steps)})") if active and rollout else "",
        window=window,
    )  # fmt: skip
    reason = '--reason "..."'
    if stable:
        book.rollback.append(
            Step(f"gateway admin rollback {name} {reason}", f"100% to {stable} (stable), one revision")
        )
    else:
        book.rollback.append(
            Step(f"gateway admin rollback {name} --to VERSION {reason}", "no stable label: name the version")
        )
    before, weights = _previous(name, revisions, dict(ep.traffic))
    if before:
        book.rollback.append(
            Step(
                f"gateway admin rollback {name} --to-revision {before} {reason}",
                f"as before: {format_traffic(weights)}",
            )
        )
    if active:
        book.rollback.append(Step(f"gateway rollout abort {name} {reason}", f"ends the rollout; traffic to {stable}"))
    target = idle[-1] if idle else "NEW"
    if not idle:
        book.rollforward.append(
            Step(
                f"gateway admin load {name} NEW {name}/NEW --sha256 SHA256 {reason}",
                "load the fix: verified, warmed, no traffic yet",
            )
        )
    guarded = "under the rules above" if rules else "add --guardrail rules: this endpoint has none"
    book.rollforward.append(
        Step(
            f"gateway rollout start {name} {target} --steps 5,25,50,100 --step-duration {duration(window)} {reason}",
            f"ramp {target} step by step, {guarded}",
        )
    )
    book.verify += [
        Step(f"gateway admin routes {name}", "traffic is where you sent it"),
        Step(f"gateway incidents {name}", "what fired; VERIFIED: the guardian's check one window after a rollback"),
        Step(f"gateway admin audit {name} --limit 5", "who changed what, and why"),
    ]
    if ep.shadows:
        book.verify.append(Step(f"gateway report shadow {name} --since {duration(window)}", "the shadow's agreement"))
    return book


def text(book: Runbook) -> str:
    """The runbook for a terminal."""
    labels = {v: k for k, v in book.labels.items()}
    now = ", ".join(f"{v} {w}%" + (f" ({labels[v]})" if v in labels else "") for v, w in book.traffic.items())
    lines = [
        f"RUNBOOK {book.endpoint} (revision {book.revision}, {when(book.committed_at)})",
        f"now: {now or MISSING}" + (f"; loaded, no traffic: {', '.join(book.idle)}" if book.idle else ""),
    ]
    if book.rollout:
        lines.append(f"rollout: {book.rollout}")
    lines += ["", _triggers_title(book)]
    width = max((len(item["rule"]) for item in book.triggers), default=0)
    for item in book.triggers:
        window = duration(item["window_seconds"])
        lines.append(
            f"  {item['rule'].ljust(width)}  -> {item['action']} (window {window}, min {item['min_samples']} samples)"
        )
        if item["description"]:
            lines.append(f"      {item['description']}")
    if not book.triggers:
        lines.append(f'  none: gateway admin guardrails {book.endpoint} --guardrail "error_rate > 2% for 5m" ...')
    for title, steps in (
        ("ROLLBACK: cause unclear, severe drop or broken compatibility: stabilise now", book.rollback),
        ("ROLLFORWARD: cause known and a small, tested fix ready", book.rollforward),
        (f"VERIFY: watch one window ({duration(book.window)}) after acting", book.verify),
    ):
        lines += ["", title]
        width = max(len(s.command) for s in steps)
        lines += [f"  {s.command.ljust(width)}  # {s.why}" for s in steps]
    return "\n".join(lines)


def _triggers_title(book: Runbook) -> str:
    if book.observe_only:
        return "TRIGGERS (observe-only: the guardian records what would fire and changes nothing)"
    if not book.triggers:
        return "TRIGGERS"
    which = "any of these breaches" if book.at_least <= 1 else f"at least {book.at_least} of these breach"
    return f"TRIGGERS: the guardian acts by itself when {which}"


def _meaning(item: dict[str, Any]) -> str:
    return (
        f"{item['action']} when {item['metric']} crosses {item['threshold']:g} over the last "
        f"{duration(item['window_seconds'])}; inconclusive with fewer than {item['min_samples']} samples per arm"
    )


def markdown(book: Runbook) -> str:
    """The runbook as a wiki page."""
    labels = {v: k for k, v in book.labels.items()}
    now = ", ".join(f"{v} {w}%" + (f" ({labels[v]})" if v in labels else "") for v, w in book.traffic.items())
    lines = [
        f"# Runbook: {book.endpoint}",
        "",
        f"Generated from route revision {book.revision} ({when(book.committed_at)}). Traffic: {now or MISSING}."
        + (f" Loaded without traffic: {', '.join(book.idle)}." if book.idle else "")
        + (f" Rollout: {book.rollout}." if book.rollout else ""),
        "",
        "## Triggers",
        "",
        _triggers_title(book).removeprefix("TRIGGERS").lstrip(": ").capitalize() or "No guardrails.",
        "",
    ]
    lines += [
        "| rule | action | window | samples | what it means |",
        "|---|---|---|---|---|",
        *[
            f"| `{t['rule']}` | {t['action']} | {duration(t['window_seconds'])} | {t['min_samples']} | "
            f"{t['description'] or _meaning(t)} |"
            for t in book.triggers
        ],
    ] if book.triggers else []  # fmt: skip
    for title, steps in (
        ("Rollback: cause unclear, severe drop or broken compatibility", book.rollback),
        ("Rollforward: cause known, small tested fix ready", book.rollforward),
        (f"Verify: one window ({duration(book.window)}) after acting", book.verify),
    ):
        lines += ["", f"## {title}", "", "```sh", *[f"{s.command}  # {s.why}" for s in steps], "```"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Fetch the endpoint's live configuration and print its runbook."""
    client = AdminClient(args)
    try:
        routes = client.call("GetRoutes", pb.GetRoutesRequest(endpoint=args.endpoint))
        versions = client.call("ListVersions", pb.ListVersionsRequest(endpoint=args.endpoint))
        revisions = client.call("ListRevisions", pb.ListRevisionsRequest(limit=100))
        try:
            rollout = client.call("GetRollout", pb.RolloutRequest(endpoint=args.endpoint))
        except grpc.RpcError as err:
            if err.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            rollout = None
    except grpc.RpcError as err:
        return rpc_failure(err, client.target, ENV_ADMIN_TARGET)
    finally:
        client.close()
    try:
        book = build(routes, versions, revisions, rollout)
    except GatewayError as err:  # a stored rule this client cannot parse (an older CLI than the gateway)
        return fail(f"{err.code.name}: {err.message}")
    if getattr(args, "json", False):
        print_json(book.to_dict())
    else:
        print(markdown(book) if args.markdown else text(book))
    return 0


def register(commands: Any) -> None:
    """Add `gateway runbook`."""
    runbook = commands.add_parser(
        "runbook", parents=[connection_options()], help="the one-screen runbook of an endpoint, from the live config"
    )
    runbook.add_argument("endpoint", help="the endpoint, e.g. ctr-ranker")
    runbook.add_argument("--markdown", action="store_true", help="print markdown, for a wiki page")
    runbook.set_defaults(handler=run)
