"""The guardian with a fake clock and real parts: gateway core, onnxruntime, SQLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.errors import InvalidInput
from gateway.faults import Fault
from gateway.guardrails.rules import RuleSet
from gateway.inference import InferRequest
from gateway.orchestration.evaluate import Status
from gateway.orchestration.rollout import RolloutDriver
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import config_text
from testkit.simulation import CTR_RULE, drive, sim_gateway


def make(tmp_path: Path, clock: SimClock, **overrides: str) -> Gateway:
    return sim_gateway(tmp_path, config_text(**overrides), clock)


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


def traffic(gateway: Gateway, clock: SimClock, seconds: int, per_second: int = 50, nan_on: str = "") -> None:
    """Requests through the real inference path, `per_second` per simulated second."""
    rng = np.random.default_rng(0)
    for _ in range(seconds):
        drive(gateway, clock, rng, per_second=per_second, nan_on=nan_on, nan_feature=3)
        clock.advance(1)


def weights(gateway: Gateway) -> dict[str, int]:
    return dict(gateway.control.state.endpoint("ctr-ranker").weights)


def test_error_rate_breach_rolls_back_in_one_tick_and_writes_an_incident(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, guardrails='["error_rate > 2% for 5m min 100"]', traffic='{"1.12": 50, "1.13": 50}')
    traffic(gateway, clock, 10)
    assert gateway.guardian.tick().incidents == []  # healthy
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.5), reason="drill")
    traffic(gateway, clock, 10)
    report = gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 100}
    (incident,) = report.incidents
    assert (incident.candidate, incident.baseline, incident.action, incident.observe_only) == (
        "1.13",
        "1.12",
        "rollback",
        False,
    )
    (verdict,) = incident.verdicts
    assert verdict["status"] == "breach" and verdict["observed"] > 0.02 and verdict["threshold"] == 0.02
    assert verdict["samples"]["1.13"] >= 100 and verdict["window_seconds"] == 300
    assert incident.revision_after == incident.revision_before + 1
    assert incident.traffic_before == {"1.12": 50, "1.13": 50} and incident.traffic_after == {"1.12": 100}
    note = gateway.incidents.get(incident.id).to_markdown()
    for section in ("## Detect", "## Decide", "## Action", "## Verification", "## Follow-ups"):
        assert section in note
    assert "error_rate > 2% for 5m min 100" in note and "Route revision" in note
    audit = gateway.control.audit("ctr-ranker")[0]
    assert (audit.actor, audit.action, audit.reason) == (
        "guardian",
        "rollback",
        "guardrail: error_rate > 2% for 5m min 100",
    )
    assert gateway.guardian.tick().incidents == []  # nothing left to roll back; no duplicate incident
    gateway.close()


def test_too_few_samples_is_inconclusive_never_pass(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, guardrails='["error_rate > 2% for 5m min 1000"]')
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=1.0), reason="drill")
    traffic(gateway, clock, 5)
    report = gateway.guardian.tick()
    (verdict,) = report.verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.INCONCLUSIVE and "not enough samples" in verdict.detail
    assert report.incidents == [] and weights(gateway) == {"1.12": 90, "1.13": 10}
    gateway.close()


def test_at_least_k_of_n(tmp_path: Path, clock: SimClock) -> None:
    rules = '{rules: ["error_rate > 2% for 5m min 50", "latency_p95_ms > 40 for 5m min 50"], at_least: 2}'
    gateway = make(tmp_path, clock, guardrails=rules, traffic='{"1.12": 50, "1.13": 50}')
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.5), reason="one rule")
    traffic(gateway, clock, 5)
    report = gateway.guardian.tick()
    assert [v.status for v in report.verdicts["ctr-ranker/1.13"]] == [Status.BREACH, Status.PASS]
    assert report.incidents == [] and weights(gateway)["1.13"] == 50
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.5, latency_ms=50), reason="both")
    traffic(gateway, clock, 5)
    assert len(gateway.guardian.tick().incidents) == 1 and weights(gateway) == {"1.12": 100}
    gateway.close()


def test_observe_only_records_and_changes_nothing(tmp_path: Path, clock: SimClock) -> None:
    rules = '{rules: ["error_rate > 2% for 5m min 20"], observe_only: true}'
    gateway = make(tmp_path, clock, guardrails=rules)
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=1.0), reason="dry run drill")
    traffic(gateway, clock, 10)
    (incident,) = gateway.guardian.tick().incidents
    assert incident.observe_only and incident.outcome == "observe-only: would have done rollback"
    assert weights(gateway) == {"1.12": 90, "1.13": 10}
    assert "observe-only" in incident.to_markdown()
    gateway.close()


def test_null_rate_spike_on_the_canary(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path,
        clock,
        guardrails='["feature_null_rate_delta > 1pt for 10m min 100"]',
        traffic='{"1.12": 50, "1.13": 50}',
    )
    traffic(gateway, clock, 5, nan_on="1.13")
    (incident,) = gateway.guardian.tick().incidents
    (verdict,) = incident.verdicts
    assert verdict["detail"] == "feature features[3]" and verdict["observed"] > 0.9
    assert weights(gateway) == {"1.12": 100}
    gateway.close()


def test_ctr_drop_from_feedback(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path, clock, guardrails='["ctr_drop > 5% p < 0.05 for 30m min 500"]', traffic='{"1.12": 50, "1.13": 50}'
    )
    rng = np.random.default_rng(3)
    routes = gateway.router.table.endpoint("ctr-ranker")
    for second in range(120):
        for i in range(100):
            key = f"u{second}-{i}"
            result = gateway.inference.infer(
                InferRequest("ctr-ranker", {"features": rng.normal(size=(1, 32)).astype(np.float32)}, routing_key=key)
            )
            ctr = 0.10 if routes.choose(key).version == "1.12" else 0.06
            gateway.feedback.feedback(result.request_id, float(rng.random() < ctr))
        clock.advance(1)
        report = gateway.guardian.tick()
        if report.incidents:
            break
    (incident,) = report.incidents
    (verdict,) = incident.verdicts
    assert verdict["p_value"] < 0.05 and verdict["observed"] > 0.05
    assert verdict["values"]["candidate_ctr"] < verdict["values"]["baseline_ctr"]
    assert weights(gateway) == {"1.12": 100}
    assert gateway.feedback.feedback("never-served", 1.0).joined is False and gateway.feedback.unknown >= 1
    gateway.close()


def test_a_canary_routed_again_after_a_ctr_rollback_starts_a_new_experiment(tmp_path: Path, clock: SimClock) -> None:
    """Found by measuring the CTR rule through the guardian (testkit/simulation.py): the experiment that
    rolled a canary back outlived the rollback, so routing the canary again at the same share, before
    a tick saw it at 0%, resumed the old evidence and rolled the new canary back on its first tick."""
    gateway = make(tmp_path, clock, guardrails=f'["{CTR_RULE}"]', traffic='{"1.12": 50, "1.13": 50}')
    windows = {v: gateway.telemetry.windows.window(SeriesKey("ctr-ranker", v)) for v in ("1.12", "1.13")}

    def second(canary_ctr: float) -> None:  # 1,000 outcomes per arm, the clicks exactly at the rates
        for version, ctr in (("1.13", canary_ctr), ("1.12", 0.05)):
            clicks = round(1000 * ctr)
            for outcome in [1.0] * clicks + [0.0] * (1000 - clicks):
                windows[version].record_outcome(outcome)
        clock.advance(1)

    gateway.guardian.tick()  # the experiment starts
    for _ in range(30):
        second(canary_ctr=0.03)
        if gateway.guardian.tick().incidents:
            break
    assert weights(gateway) == {"1.12": 100}  # a 40% drop: rolled back
    gateway.control.set_traffic("oncall", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="fixed build, try again")
    second(canary_ctr=0.05)  # the new canary is as good as stable
    report = gateway.guardian.tick()  # a new experiment: it counts from this tick on
    assert report.incidents == [] and weights(gateway) == {"1.12": 50, "1.13": 50}
    assert report.verdicts["ctr-ranker/1.13"][0].samples == {"1.13": 0, "1.12": 0}
    second(canary_ctr=0.05)
    report = gateway.guardian.tick()
    assert report.incidents == [] and weights(gateway) == {"1.12": 50, "1.13": 50}
    (verdict,) = report.verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.PASS and verdict.samples == {"1.13": 1000, "1.12": 1000}
    gateway.close()


def test_rollout_steps_hold_pause_abort_and_survive_restart(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    rollouts = gateway.rollouts
    rollouts.start(
        "ci",
        "ctr-ranker",
        "1.14",
        steps=[10, 50, 100],
        step_seconds=60,
        rules=["error_rate > 2% for 1m min 50"],
        reason="ramp",
    )
    assert weights(gateway) == {"1.12": 90, "1.14": 10}
    assert gateway.control.state.endpoint("ctr-ranker").labels["canary"] == "1.14"
    traffic(gateway, clock, 30, per_second=5)  # too few canary samples: inconclusive holds the step
    gateway.guardian.tick()
    traffic(gateway, clock, 40, per_second=5)
    gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 90, "1.14": 10}
    traffic(gateway, clock, 60, per_second=60)
    gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 50, "1.14": 50}
    rollouts.pause("oncall", "ctr-ranker", reason="look at dashboards")
    traffic(gateway, clock, 90, per_second=20)
    gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 50, "1.14": 50}  # paused: no advance
    gateway.close()

    restarted = make(tmp_path, clock, traffic='{"1.12": 100}')  # same store: the rollout resumes from it
    state = restarted.rollouts.require("ctr-ranker")
    assert (state.status, state.step_index, state.share) == ("paused", 1, 50)
    assert weights(restarted) == {"1.12": 50, "1.14": 50}
    restarted.rollouts.resume("oncall", "ctr-ranker", reason="looks fine")
    traffic(restarted, clock, 61, per_second=20)
    restarted.guardian.tick()
    final = restarted.rollouts.require("ctr-ranker")
    assert final.status == "completed"
    ep = restarted.control.state.endpoint("ctr-ranker")
    assert dict(ep.weights) == {"1.14": 100} and ep.labels["stable"] == "1.14"
    restarted.close()


def test_rollout_breach_rolls_back_and_fails_it_abort_returns_to_stable(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    rollouts = gateway.rollouts
    rollouts.start(
        "ci",
        "ctr-ranker",
        "1.13",
        steps=[20, 100],
        step_seconds=60,
        rules=["error_rate > 2% for 1m min 20"],
        reason="x",
    )
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.3), reason="bad build")
    traffic(gateway, clock, 10)
    (incident,) = gateway.guardian.tick().incidents
    assert "rollout of 1.13 marked failed" in incident.outcome
    assert rollouts.require("ctr-ranker").status == "failed" and weights(gateway) == {"1.12": 100}
    rollouts.start("ci", "ctr-ranker", "1.14", steps=[20, 100], step_seconds=60, reason="next")
    rollouts.abort("oncall", "ctr-ranker", reason="changed my mind")
    assert rollouts.require("ctr-ranker").status == "aborted" and weights(gateway) == {"1.12": 100}
    gateway.close()


def test_pause_action_holds_a_running_rollout(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    gateway.rollouts.start(
        "ci",
        "ctr-ranker",
        "1.13",
        steps=[50, 100],
        step_seconds=60,
        rules=["error_rate > 2% for 1m min 20 action pause"],
        reason="x",
    )
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.3), reason="flaky")
    traffic(gateway, clock, 5)
    (incident,) = gateway.guardian.tick().incidents
    assert incident.action == "pause" and incident.outcome.startswith("paused the rollout of 1.13")
    assert weights(gateway) == {"1.12": 50, "1.13": 50}
    gateway.close()


def test_a_candidate_routed_to_again_while_still_breaching_is_rolled_back_again(
    tmp_path: Path, clock: SimClock
) -> None:
    gateway = make(tmp_path, clock, guardrails='["error_rate > 2% for 5m min 100"]', traffic='{"1.12": 50, "1.13": 50}')
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.5), reason="drill")
    traffic(gateway, clock, 10)
    assert len(gateway.guardian.tick().incidents) == 1 and weights(gateway) == {"1.12": 100}
    # No tick sees 1.13 without traffic before the operator routes to it again.
    gateway.control.set_traffic("oncall", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="retry")
    traffic(gateway, clock, 10)
    (incident,) = gateway.guardian.tick().incidents
    assert incident.candidate == "1.13" and incident.outcome == "rolled back to 1.12"
    assert weights(gateway) == {"1.12": 100}
    gateway.close()


def test_observe_only_then_enforcing_acts_on_a_breach_that_goes_on(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, guardrails='{rules: ["error_rate > 2% for 5m min 20"], observe_only: true}')
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=1.0), reason="drill")
    traffic(gateway, clock, 10)
    assert [i.observe_only for i in gateway.guardian.tick().incidents] == [True]
    traffic(gateway, clock, 2)
    assert gateway.guardian.tick().incidents == []  # still breaching: recorded once
    gateway.control.set_guardrails("oncall", "ctr-ranker", ["error_rate > 2% for 5m min 20"], reason="enforce")
    traffic(gateway, clock, 2)
    (incident,) = gateway.guardian.tick().incidents
    assert not incident.observe_only and weights(gateway) == {"1.12": 100}
    gateway.close()


def test_null_rate_breach_when_the_guardian_ticked_before_any_traffic(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(
        tmp_path,
        clock,
        guardrails='["feature_null_rate_delta > 1pt for 10m min 100"]',
        traffic='{"1.12": 50, "1.13": 50}',
    )
    gateway.guardian.tick()  # creates both windows before either version served a request
    traffic(gateway, clock, 5, nan_on="1.13")
    (incident,) = gateway.guardian.tick().incidents
    (verdict,) = incident.verdicts
    assert verdict["status"] == "breach" and verdict["detail"] == "feature features[3]"
    assert weights(gateway) == {"1.12": 100}
    gateway.close()


def outcomes(gateway: Gateway, version: str, clicks: int, total: int) -> None:
    window = gateway.telemetry.windows.window(SeriesKey("ctr-ranker", version))
    for i in range(total):
        window.record_outcome(1.0 if i < clicks else 0.0)


def test_the_ctr_test_counts_outcomes_from_its_start_and_restarts_with_the_candidate(
    tmp_path: Path, clock: SimClock
) -> None:
    gateway = make(
        tmp_path, clock, guardrails='["ctr_drop > 5% p < 0.05 for 30m min 500"]', traffic='{"1.12": 50, "1.13": 50}'
    )
    outcomes(gateway, "1.13", 0, 2000)  # before the test began: not its evidence
    outcomes(gateway, "1.12", 1000, 2000)
    (verdict,) = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.INCONCLUSIVE and verdict.samples == {"1.13": 0, "1.12": 0}
    clock.advance(1)
    outcomes(gateway, "1.13", 300, 600)
    outcomes(gateway, "1.12", 300, 600)
    report = gateway.guardian.tick()
    (verdict,) = report.verdicts["ctr-ranker/1.13"]
    assert verdict.status is Status.PASS and verdict.samples == {"1.13": 600, "1.12": 600}
    assert report.incidents == []
    # The candidate leaves and comes back at the same share: a new test, from zero.
    gateway.control.set_traffic("oncall", "ctr-ranker", {"1.12": 100}, reason="pause the test")
    gateway.guardian.tick()
    gateway.control.set_traffic("oncall", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="again")
    (verdict,) = gateway.guardian.tick().verdicts["ctr-ranker/1.13"]
    assert verdict.samples == {"1.13": 0, "1.12": 0}
    gateway.close()


def test_a_rollout_without_guardrails_advances_and_completes(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    rollouts = gateway.rollouts
    rollouts.start("ci", "ctr-ranker", "1.14", steps=[10, 50, 100], step_seconds=60, reason="ramp")
    clock.advance(61)
    gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 50, "1.14": 50}
    clock.advance(61)
    gateway.guardian.tick()
    assert rollouts.require("ctr-ranker").status == "completed" and weights(gateway) == {"1.14": 100}
    gateway.close()


def test_a_rollout_with_a_shadow_rule_advances_on_its_canary_rules(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    gateway.rollouts.start(
        "ci",
        "ctr-ranker",
        "1.14",
        steps=[10, 50, 100],
        step_seconds=60,
        rules=["error_rate > 2% for 1m min 50", "shadow_disagreement > 50% for 1m min 1 action alert-only"],
        reason="ramp",
    )
    traffic(gateway, clock, 61, per_second=20)
    gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 50, "1.14": 50}
    gateway.close()


def test_rollout_rules_longer_than_the_history_kept_are_refused(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    driver = RolloutDriver(gateway.control, clock=clock, history_seconds=1800)
    with pytest.raises(InvalidInput, match=r"looks at 3600 s but the gateway keeps 1800 s.*--window-history"):
        driver.start("ci", "ctr-ranker", "1.14", rules=["error_rate > 2% for 1h"], reason="ramp")
    assert weights(gateway) == {"1.12": 100} and driver.get("ctr-ranker") is None
    gateway.close()


def test_an_operators_traffic_change_ends_the_rollout(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    rollouts = gateway.rollouts
    rollouts.start("ci", "ctr-ranker", "1.14", steps=[10, 50, 100], step_seconds=60, reason="ramp")
    gateway.control.rollback("oncall", "ctr-ranker", reason="1.14 looks bad on the dashboard")
    clock.advance(61)
    gateway.guardian.tick()
    rollout = rollouts.require("ctr-ranker")
    assert rollout.status == "aborted" and "traffic changed outside the rollout" in rollout.history[-1]["event"]
    clock.advance(61)
    gateway.guardian.tick()
    assert weights(gateway) == {"1.12": 100}  # the driver does not ramp it again
    assert gateway.control.audit("ctr-ranker")[0].action == "rollout-end"
    # An operator who promotes the version finishes the rollout.
    rollouts.start("ci", "ctr-ranker", "1.14", steps=[10, 50, 100], step_seconds=60, reason="again")
    gateway.control.promote("oncall", "ctr-ranker", reason="good enough")
    gateway.guardian.tick()
    assert rollouts.require("ctr-ranker").status == "completed"
    gateway.close()


def test_advance_with_a_stale_record_does_not_undo_a_pause(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}')
    rollouts = gateway.rollouts
    rollouts.start("ci", "ctr-ranker", "1.14", steps=[10, 50, 100], step_seconds=60, reason="ramp")
    seen = rollouts.require("ctr-ranker")  # what a guardian tick read
    rollouts.pause("oncall", "ctr-ranker", reason="hold on")
    clock.advance(61)
    assert rollouts.advance(seen, RuleSet(), []) is None
    assert rollouts.require("ctr-ranker").status == "paused" and weights(gateway) == {"1.12": 90, "1.14": 10}
    gateway.close()


def test_an_incident_shows_only_the_rollout_it_concerns(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}', guardrails='["error_rate > 2% for 5m min 20"]')
    rollouts = gateway.rollouts
    rollouts.start("ci", "ctr-ranker", "1.14", steps=[50, 100], step_seconds=60, reason="ramp")
    traffic(gateway, clock, 61, per_second=2)
    gateway.guardian.tick()
    assert rollouts.require("ctr-ranker").status == "completed"
    gateway.control.set_traffic("oncall", "ctr-ranker", {"1.14": 90, "1.13": 10}, reason="try 1.13")
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=1.0), reason="drill")
    traffic(gateway, clock, 10)
    (incident,) = gateway.guardian.tick().incidents
    assert incident.candidate == "1.13" and incident.rollout is None
    assert "Rollout of" not in incident.to_markdown()
    gateway.close()


def test_one_window_after_a_rollback_the_incident_records_whether_stable_is_healthy(
    tmp_path: Path, clock: SimClock
) -> None:
    rules = '["error_rate > 2% for 1m min 100", "latency_p95_ratio > 3 for 1m min 100"]'
    gateway = make(tmp_path, clock, guardrails=rules, traffic='{"1.12": 50, "1.13": 50}')
    traffic(gateway, clock, 60, per_second=5)
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.5), reason="drill")
    traffic(gateway, clock, 60, per_second=5)
    (incident,) = gateway.guardian.tick().incidents
    pending = gateway.incidents.get(incident.id)
    assert pending.verification is not None and pending.verification["status"] == "pending"
    assert pending.verification["version"] == "1.12" and pending.verification["window_seconds"] == 60
    assert "Pending: at " in pending.to_markdown() and "[ ]" not in pending.to_markdown().split("## Follow-ups")[0]
    traffic(gateway, clock, 30, per_second=5)
    assert gateway.guardian.tick().verified == []  # half a window: not yet
    traffic(gateway, clock, 31, per_second=5)
    (verified,) = gateway.guardian.tick().verified
    check = gateway.incidents.get(incident.id).verification
    assert check is not None and verified.id == incident.id
    assert check["status"] == "healthy", check
    assert [v["rule"] for v in check["verdicts"]] == ["error_rate > 2% for 1m min 100"]
    assert check["verdicts"][0]["samples"]["1.12"] >= 250 and check["traffic"] == {"1.12": 100}
    note = gateway.incidents.get(incident.id).to_markdown()
    assert "one window (60 s) after the rollback, 1.12 was **healthy**" in note
    assert f"Routes then: revision {incident.revision_after}; traffic 1.12 100%." in note
    assert gateway.guardian.tick().verified == [] and gateway.guardian.verifier.pending == 0  # once
    gateway.close()


def test_a_stable_that_is_still_failing_is_recorded_as_not_healthy(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, guardrails='["error_rate > 2% for 1m min 100"]', traffic='{"1.12": 50, "1.13": 50}')
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(error_rate=0.5), reason="drill")
    traffic(gateway, clock, 60, per_second=5)
    (incident,) = gateway.guardian.tick().incidents
    # The cause was upstream: stable fails too once it takes all the traffic.
    gateway.control.set_fault("oncall", "ctr-ranker", "1.12", Fault(error_rate=0.3), reason="upstream")
    traffic(gateway, clock, 61, per_second=5)
    gateway.guardian.tick()
    check = gateway.incidents.get(incident.id).verification
    assert check is not None and check["status"] == "unhealthy" and check["verdicts"][0]["status"] == "breach"
    assert "1.12 was **NOT healthy**" in gateway.incidents.get(incident.id).to_markdown()
    gateway.close()


def test_a_comparing_rule_checks_stable_against_itself_and_a_restart_says_what_it_lost(
    tmp_path: Path, clock: SimClock
) -> None:
    rules = '["latency_p95_ratio > 2 for 1m min 50", "error_rate > 50% for 1m min 50"]'
    gateway = make(tmp_path, clock, guardrails=f"{{rules: {rules}, at_least: 1}}", traffic='{"1.12": 50, "1.13": 50}')
    gateway.control.set_fault("oncall", "ctr-ranker", "1.13", Fault(latency_ms=30), reason="slow canary")
    traffic(gateway, clock, 60, per_second=3)
    (incident,) = gateway.guardian.tick().incidents
    assert incident.verification is not None and incident.verification["rules"] == [
        "latency_p95_ratio > 2 for 1m min 50"
    ]
    gateway.close()
    # A new process on the same store picks the check up, without the snapshot taken when the rule fired.
    again = make(tmp_path, clock, guardrails=f"{{rules: {rules}, at_least: 1}}", traffic='{"1.12": 50, "1.13": 50}')
    traffic(again, clock, 61, per_second=3)
    assert [i.id for i in again.guardian.tick().verified] == [incident.id]
    check = again.incidents.get(incident.id).verification
    assert check is not None and check["status"] == "inconclusive"
    assert "the gateway restarted within the window" in check["verdicts"][0]["detail"]
    again.close()


def test_the_note_states_what_the_rollout_was_and_what_the_guardian_did(tmp_path: Path, clock: SimClock) -> None:
    gateway = make(tmp_path, clock, traffic='{"1.12": 100}', guardrails='["error_rate > 2% for 1m min 20"]')
    gateway.rollouts.start("ci", "ctr-ranker", "1.14", steps=[50, 100], step_seconds=600, reason="ramp")
    gateway.control.set_fault("oncall", "ctr-ranker", "1.14", Fault(error_rate=1.0), reason="drill")
    traffic(gateway, clock, 10, per_second=10)
    (incident,) = gateway.guardian.tick().incidents
    note = incident.to_markdown()
    assert "The rollout of 1.14 was running at step 1 of [50, 100]; the guardian marked it failed." in note
    assert "is now" not in note
    gateway.close()
