"""`gateway runbook`: built from the live configuration, generic over guardrail metrics."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.cli.runbook import build, markdown, text, trigger
from gateway.guardrails.rules import Metric, Rule, parse_rule
from gateway.pb.gateway.v1 import admin_pb2 as pb


def _routes(guardrails: list[str], traffic: dict[str, int], at_least: int = 1) -> pb.Routes:
    routes = pb.Routes(revision=7, committed_at=1_790_000_000.0)
    ep = routes.endpoints.add(name="ctr-ranker", versions=["1.12", "1.13", "1.14", "1.15"], guardrails=guardrails)
    ep.traffic.update(traffic)
    ep.labels.update({"stable": "1.12", "canary": "1.13"})
    ep.guardrails_at_least = at_least if guardrails else 0
    return routes


def _versions() -> pb.ListVersionsResponse:
    return pb.ListVersionsResponse(
        versions=[pb.VersionInfo(endpoint="ctr-ranker", version=v, state="ready") for v in ("1.12", "1.13", "1.14")]
        + [pb.VersionInfo(endpoint="ctr-ranker", version="1.15", state="failed")]
    )


def _revisions() -> pb.ListRevisionsResponse:
    response = pb.ListRevisionsResponse()
    for number, traffic in (
        (7, {"1.12": 75, "1.13": 25}),
        (6, {"1.12": 75, "1.13": 25}),
        (5, {"1.12": 90, "1.13": 10}),
    ):
        revision = response.revisions.add(revision=number)
        revision.endpoints.add(name="ctr-ranker").traffic.update(traffic)
    return response


def test_the_runbook_fills_in_this_endpoints_versions_and_rules() -> None:
    rules = ["error_rate > 2% for 5m min 500", "latency_p95_ratio > 1.3 for 10m"]
    book = build(_routes(rules, {"1.12": 75, "1.13": 25}, at_least=2), _versions(), _revisions(), None)
    screen = text(book)
    assert "now: 1.12 75% (stable), 1.13 25% (canary); loaded, no traffic: 1.14" in screen
    assert "when at least 2 of these breach" in screen
    assert "error_rate > 2% for 5m min 500   -> rollback (window 5m, min 500 samples)" in screen
    assert 'gateway admin rollback ctr-ranker --reason "..."' in screen and "100% to 1.12 (stable)" in screen
    # The routes before the last change of this endpoint, not merely the previous revision.
    assert "gateway admin rollback ctr-ranker --to-revision 5" in screen and "1.12 90%, 1.13 10%" in screen
    # 1.14 is loaded and idle: the rollforward names it; 1.15 failed to load and is not offered.
    assert "gateway rollout start ctr-ranker 1.14 --steps 5,25,50,100 --step-duration 10m" in screen
    assert "VERIFY: watch one window (10m) after acting" in screen
    assert len(screen.splitlines()) <= 30  # one screen
    page = markdown(book)
    assert page.startswith("# Runbook: ctr-ranker") and "## Triggers" in page and "```sh" in page
    assert "| `latency_p95_ratio > 1.3 for 10m` | rollback | 10m | 100 |" in page


def test_without_an_idle_version_the_rollforward_loads_one_and_a_rollout_can_be_aborted() -> None:
    rollout = pb.RolloutStatus(endpoint="ctr-ranker", version="1.14", status="running", steps=[5, 25], step_index=1)
    versions = pb.ListVersionsResponse(versions=[pb.VersionInfo(version="1.12", state="ready")])
    book = build(_routes([], {"1.12": 75, "1.14": 25}), versions, _revisions(), rollout)
    screen = text(book)
    assert "rollout: 1.14 running at 25% (step 2 of 2)" in screen
    assert 'gateway rollout abort ctr-ranker --reason "..."' in screen
    assert "gateway admin load ctr-ranker NEW ctr-ranker/NEW --sha256 SHA256" in screen
    assert "none: gateway admin guardrails ctr-ranker" in screen


def test_every_metric_renders_without_an_edit_here() -> None:
    rules = [Rule(f"{m.value} > 1 for 5m", m, 1.0, 300, alpha=0.05) for m in Metric]
    routes = _routes([], {"1.12": 100})
    book = build(routes, _versions(), _revisions(), None)
    book.triggers = [trigger(r) for r in rules]
    screen, page = text(book), markdown(book)
    for metric in Metric:
        assert f"{metric.value} > 1 for 5m" in screen and f"`{metric.value} > 1 for 5m`" in page


def test_a_rule_that_says_itself_in_words_is_shown_in_words() -> None:
    @dataclass(frozen=True)
    class Worded(Rule):
        def describe(self) -> str:
            return "Roll back when the canary errs"

    base = parse_rule("error_rate > 2% for 5m")
    worded = Worded(base.text, base.metric, base.threshold, base.window_seconds)
    assert trigger(worded)["description"] == "Roll back when the canary errs"
