"""`gateway report shadow ...`: the shadow comparison report as a table, JSON or an HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import grpc

from gateway.cli.connect import ENV_ADMIN_TARGET, AdminClient, connection_options
from gateway.cli.output import MISSING, fail, print_json, rpc_failure, shown, sorted_map, table
from gateway.cli.report_html import render
from gateway.errors import InvalidInput
from gateway.guardrails.rules import parse_duration
from gateway.pb.gateway.v1 import admin_pb2 as pb


def _quantiles(q: pb.Quantiles) -> dict[str, float]:
    return {"p50": q.p50, "p95": q.p95, "p99": q.p99, "max": q.max}


def report_dict(report: pb.ShadowReport) -> dict[str, Any]:
    """JSON-ready form of a report."""
    return {
        "endpoint": report.endpoint,
        "shadow_version": report.shadow_version,
        "percent": report.percent,
        "window_seconds": report.window_seconds,
        "mirrored": report.mirrored,
        "compared": report.compared,
        "dropped": report.dropped,
        "shadow_errors": sum(report.errors.values()),
        "errors": sorted_map(report.errors),
        "decisions": report.decisions,
        "agree": report.agree,
        "agreement_rate": report.agreement_rate,
        "agreement_ci": [report.agreement_ci_low, report.agreement_ci_high],
        "diff": _quantiles(report.diff),
        "primary_latency_ms": {k: v for k, v in _quantiles(report.primary_latency_ms).items() if k != "max"},
        "shadow_latency_ms": {k: v for k, v in _quantiles(report.shadow_latency_ms).items() if k != "max"},
        "latency_measure": report.latency_measure,
        "latency_samples": report.latency_samples,
        "top_divergent": [{"request_id": d.request_id, "max_abs_diff": d.max_abs_diff} for d in report.top_divergent],
        "primary_versions": list(report.primary_versions),
        "diff_histogram": [{"upper": b.upper, "count": b.count} for b in report.diff_histogram],
        "note": report.note,
    }


def _pct(value: float | None) -> str:
    return MISSING if value is None or shown(value) == MISSING else f"{value * 100:.2f}%"


def _ms(value: float | None) -> str:
    return shown(value, ".3f")


def _print(body: dict[str, Any]) -> None:
    low, high = body["agreement_ci"]
    if body.get("note"):
        print(f"note: {body['note']}")
    print(
        f"shadow {body['endpoint']} {body['shadow_version']} ({body['percent']}% mirrored), "
        f"last {body['window_seconds']} s, primaries {', '.join(body['primary_versions']) or MISSING}"
    )
    print(
        f"  copies: mirrored {body['mirrored']}, compared {body['compared']}, dropped {body['dropped']}, "
        f"shadow errors {body['shadow_errors']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(body['errors'].items()))})" if body["errors"] else "")
    )
    print(
        f"  agreement: {_pct(body['agreement_rate'])} of {body['decisions']} decisions "
        f"(95% CI {_pct(low)} to {_pct(high)})"
    )
    diff = body["diff"]
    print(
        f"  largest |diff| per request: p50 {shown(diff['p50'], '.3g')}  p95 {shown(diff['p95'], '.3g')}  "
        f"p99 {shown(diff['p99'], '.3g')}  max {shown(diff['max'], '.3g')}"
    )
    rows = [[q, _ms(body["primary_latency_ms"][q]), _ms(body["shadow_latency_ms"][q])] for q in ("p50", "p95", "p99")]
    print(f"  latency: {body['latency_measure'] or MISSING} ({body['latency_samples']} requests)")
    print(table(["LATENCY MS", "PRIMARY", "SHADOW"], rows))
    if body["top_divergent"]:
        print(
            table(
                ["MOST DIVERGENT REQUEST", "MAX |DIFF|"],
                [[d["request_id"], shown(d["max_abs_diff"], ".4g")] for d in body["top_divergent"]],
            )
        )


def run_shadow(args: argparse.Namespace) -> int:
    """Fetch and show one shadow report."""
    try:
        window = parse_duration(args.since, bare_seconds=True)
    except InvalidInput as err:
        return fail(f"--since: {err.message}", 2)
    client = AdminClient(args)
    try:
        report = client.call(
            "GetShadowReport",
            pb.GetShadowReportRequest(
                endpoint=args.endpoint, shadow_version=args.version or "", window_seconds=window, top=args.top
            ),
        )
    except grpc.RpcError as err:
        return rpc_failure(err, client.target, ENV_ADMIN_TARGET)
    finally:
        client.close()
    body = report_dict(report)
    if args.html:
        Path(args.html).write_text(render(body))
    if getattr(args, "json", False):
        print_json(body)
    else:
        _print(body)
        if args.html:
            print(f"wrote {args.html}")
    return 0


def register(commands: Any) -> None:
    """Add `gateway report shadow`."""
    common = connection_options()
    report = commands.add_parser("report", parents=[common], help="reports: shadow comparisons")
    kinds = report.add_subparsers(dest="report_kind", required=True, metavar="REPORT")
    shadow = kinds.add_parser("shadow", parents=[common], help="how a shadow version compares with the primary")
    shadow.add_argument("endpoint", help="the endpoint, e.g. ctr-ranker")
    shadow.add_argument("--version", help="the shadow version (default: the endpoint's only shadow)")
    shadow.add_argument("--since", default="1h", help="window: 90s, 15m, 2h, 1d (default 1h)")
    shadow.add_argument("--top", type=int, default=10, help="most divergent requests to list")
    shadow.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with charts")
    shadow.set_defaults(handler=run_shadow)
