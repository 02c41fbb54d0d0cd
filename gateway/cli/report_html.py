"""One self-contained HTML page for a shadow report: inline SVG charts, no network needed."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d2433;max-width:960px}
h1{font-size:1.4rem;margin-bottom:.2rem} h2{font-size:1.1rem;margin-top:2rem}
.muted{color:#5b6478} table{border-collapse:collapse;margin-top:.5rem}
td,th{padding:.25rem .8rem;border-bottom:1px solid #e3e6ee;text-align:right} th{text-align:left}
td:first-child{text-align:left} .ok{color:#16794c} .warn{color:#b45309} .bad{color:#b91c1c}
svg text{font-size:11px;fill:#1d2433}
"""


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _bar_chart(title: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]]) -> str:
    """Grouped vertical bars; `series` is (name, colour, values per label)."""
    width, height, left, bottom, top = 640, 240, 48, 36, 20
    groups = max(len(labels), 1)
    top_value = max([v for _, _, values in series for v in values if not math.isnan(v)] + [1e-12])
    plot_w, plot_h = width - left - 10, height - bottom - top
    group_w = plot_w / groups
    bar_w = group_w * 0.8 / max(len(series), 1)
    parts = [
        f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#9aa3b5"/>',
        f'<text x="4" y="{top + 4}">{_fmt(top_value)}</text><text x="4" y="{top + plot_h}">0</text>',
    ]
    for g, label in enumerate(labels):
        x0 = left + g * group_w + group_w * 0.1
        for s, (_name, colour, values) in enumerate(series):
            value = values[g] if g < len(values) and not math.isnan(values[g]) else 0.0
            bar_h = plot_h * value / top_value
            x = x0 + s * bar_w
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{bar_h:.1f}" fill="{colour}">'
                f"<title>{html.escape(label)}: {_fmt(value)}</title></rect>"
            )
        parts.append(
            f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{height - 18}" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
    legend_x = left
    for name, colour, _ in series:
        parts.append(f'<rect x="{legend_x}" y="{height - 12}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{height - 3}">{html.escape(name)}</text>')
        legend_x += 14 + 8 * len(name) + 20
    parts.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def _edge_label(upper: float) -> str:
    if upper == 0:
        return "0"
    if math.isinf(upper):
        return "> 1"
    return f"<= {upper:g}"


def render(report: dict[str, Any]) -> str:
    """The report as a complete HTML document."""
    rate, low, high = report["agreement_rate"], report["agreement_ci"][0], report["agreement_ci"][1]
    verdict = (
        "ok" if not math.isnan(rate) and low >= 0.97 else ("warn" if not math.isnan(rate) and rate >= 0.97 else "bad")
    )
    counts = "".join(
        f"<tr><td>{k}</td><td>{report[k]}</td></tr>" for k in ("mirrored", "compared", "dropped", "shadow_errors")
    )
    errors = ", ".join(f"{code}: {n}" for code, n in sorted(report["errors"].items())) or "none"
    latency_rows = "".join(
        f"<tr><td>{q}</td><td>{_fmt(report['primary_latency_ms'][q])}</td><td>{_fmt(report['shadow_latency_ms'][q])}</td></tr>"
        for q in ("p50", "p95", "p99")
    )
    diff_rows = "".join(
        f"<tr><td>{q}</td><td>{_fmt(report['diff'][q])}</td></tr>" for q in ("p50", "p95", "p99", "max")
    )
    divergent = "".join(
        f"<tr><td>{html.escape(r['request_id'])}</td><td>{_fmt(r['max_abs_diff'])}</td></tr>"
        for r in report["top_divergent"]
    )
    buckets = report["diff_histogram"]
    diff_chart = _bar_chart(
        "Per-request largest absolute difference (requests per bucket)",
        [_edge_label(b["upper"]) for b in buckets],
        [("requests", "#4f6bed", [float(b["count"]) for b in buckets])],
    )
    latency_chart = _bar_chart(
        "Latency, primary vs shadow (ms)",
        ["p50", "p95", "p99"],
        [
            ("primary", "#4f6bed", [report["primary_latency_ms"][q] for q in ("p50", "p95", "p99")]),
            ("shadow", "#e07a2f", [report["shadow_latency_ms"][q] for q in ("p50", "p95", "p99")]),
        ],
    )
    title = f"Shadow report: {report['endpoint']} {report['shadow_version']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">Mirrors {report["percent"]}% of live requests; last {report["window_seconds"]} s;
primaries: {html.escape(", ".join(report["primary_versions"]) or "-")}</p>
<h2>Agreement</h2>
<p class="{verdict}"><strong>{_fmt(rate * 100 if not math.isnan(rate) else rate, 4)}%</strong>
of {report["decisions"]} decisions agree (95% CI {_fmt(low * 100, 4)}% to {_fmt(high * 100, 4)}%)</p>
<table><tr><th>copies</th><th></th></tr>{counts}</table>
<p class="muted">Shadow errors by code: {html.escape(errors)}</p>
<h2>Output differences</h2>
{diff_chart}
<table><tr><th>largest |diff| per request</th><th></th></tr>{diff_rows}</table>
<h2>Latency</h2>
{latency_chart}
<table><tr><th>ms</th><th>primary</th><th>shadow</th></tr>{latency_rows}</table>
<h2>Most divergent requests</h2>
<table><tr><th>request id</th><th>largest |diff|</th></tr>{divergent}</table>
</body></html>
"""
