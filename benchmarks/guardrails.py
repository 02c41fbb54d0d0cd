"""Issue 6's figures: breach onset to rollback, the guardian's CPU per tick, and the CTR rule.

All on a simulated clock with the real gateway core (onnxruntime, SQLite, windows, guardian):

- onset -> rollback: traffic flows at 50 requests per simulated second (10% to the canary),
  healthy for the rule's window first; at t0 the canary starts failing, slowing down or
  sending missing features; the guardian ticks every simulated second; the figure is the
  simulated time until traffic is back on stable, against the rule's window + one tick;
  5 seeds (traffic and `random`, which the fault injector draws from), median and range.
- guardian CPU per tick: 10 endpoints x 3 versions, 4 rules each, windows filled for 30
  minutes with Feedback outcomes for every request; process CPU time per tick, median of 50
  ticks, one simulated second of traffic between ticks (outside the timed region).
- the CTR rule through the guardian (testkit.simulation.ctr_rollouts): back-to-back 50/50
  canaries, outcomes into the sliding windows every simulated second, the guardian ticking
  every second with the rule as written; the A/A false-rollback rate and the power for
  5.0% -> 4.5% by 60,000 outcomes per arm. At 25 outcomes per arm per second a run lasts
  40 minutes, beyond the rule's 30-minute window and the windows' 30-minute history.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.faults import Fault
from testkit.gateways import MODELS
from testkit.simulation import CTR_RULE, CtrSetup, ctr_rollouts, drive, endpoint_yaml, sim_gateway

SEEDS = (1, 2, 3, 4, 5)
FILL_SECONDS, TICKS = 1800, 50  # guardian CPU: simulated seconds of traffic before the timed ticks, timed ticks
CTR_RUNS = 200  # simulated canaries per CTR figure


def _weights(gateway: Gateway) -> dict[str, int]:
    return dict(gateway.control.state.endpoint("ctr-ranker").weights)


def onset_to_rollback(rule: str, fault: Fault | None, nan_on: str, seed: int) -> tuple[float | None, int]:
    """Simulated seconds from the onset to the rollback (None: it rolled back on healthy traffic, before
    the onset), and the rule's window + one tick. Healthy traffic fills the longest window first."""
    clock = SimClock()
    rng = np.random.default_rng(seed)
    random.seed(seed)  # gateway.faults draws injected errors from `random`
    with tempfile.TemporaryDirectory() as scratch:
        gateway = sim_gateway(Path(scratch), "endpoints:\n" + endpoint_yaml("ctr-ranker", [rule]), clock)
        try:
            before = _weights(gateway)
            rules = gateway.control.state.endpoint("ctr-ranker").guardrails
            for _ in range(max(r.window_seconds for r in rules.rules)):  # healthy traffic fills every window
                drive(gateway, clock, rng)
                clock.advance(1)
                gateway.guardian.tick()
            if _weights(gateway) != before:
                return None, rules.rules[0].window_seconds + 1
            if fault is not None:
                gateway.control.set_fault("bench", "ctr-ranker", "1.13", fault, reason="onset")
            onset = clock.now
            window = rules.rules[0].window_seconds
            while clock.now - onset < window * 3:
                drive(gateway, clock, rng, nan_on=nan_on)
                clock.advance(1)
                gateway.guardian.tick()
                if _weights(gateway) == {"1.12": 100}:
                    break
            return clock.now - onset, window + 1
        finally:
            gateway.close()


def guardian_cpu_per_tick(fill_seconds: int = FILL_SECONDS, ticks: int = TICKS) -> tuple[float, int, int]:
    """Median CPU seconds per tick with 10 endpoints x 3 versions and 4 rules each, windows full.

    Every request gets a Feedback outcome (CTR 5% on every version, an A/A test), so the CTR rule's
    sequential test runs (its experiments start at a first tick before the fill); one second of
    traffic on every endpoint runs before each timed tick, outside the timed region. Also returns the fewest
    CTR verdicts with a p-value in a timed tick (20 when every canary's test ran) and the incidents
    in the timed ticks (a rollback would change the workload).
    """
    clock = SimClock()
    rng = np.random.default_rng(9)
    random.seed(9)
    rules = [
        "error_rate > 2% for 5m min 100",
        "latency_p95_ratio > 1.3 for 10m",
        "feature_null_rate_delta > 1pt for 10m",
        CTR_RULE,
    ]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        for i in range(10):
            shutil.copytree(MODELS / "ctr-ranker", root / f"ep-{i}")
        text = "endpoints:\n" + "".join(
            endpoint_yaml(f"ep-{i}", rules, '{"1.12": 80, "1.13": 10, "1.14": 10}') for i in range(10)
        )
        gateway = sim_gateway(Path(scratch), text, clock, model_root=root)
        try:

            def second() -> None:
                for i in range(10):
                    drive(gateway, clock, rng, endpoint=f"ep-{i}", ctr=0.05)
                clock.advance(1)

            gateway.guardian.tick()  # starts each canary's CTR experiment: it counts outcomes from here on
            for _ in range(fill_seconds):  # every endpoint busy (not ticking: no early rollbacks on few samples)
                second()
            samples, ctr_verdicts, incidents = [], [], 0
            for _ in range(ticks):
                second()
                started = time.process_time()
                report = gateway.guardian.tick()
                samples.append(time.process_time() - started)
                incidents += len(report.incidents)
                ctr_verdicts.append(
                    sum(v.p_value is not None for vs in report.verdicts.values() for v in vs if v.rule.text == CTR_RULE)
                )
        finally:
            gateway.close()
    return statistics.median(samples), min(ctr_verdicts), incidents


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    del seconds, rounds, concurrencies
    cases = [
        ("error_rate > 2% for 5m min 100", Fault(error_rate=0.1), "", "canary fails 10% of requests"),
        ("latency_p95_ratio > 1.3 for 10m", Fault(latency_ms=20), "", "canary +20 ms per request"),
        ("feature_null_rate_delta > 1pt for 10m", None, "1.13", "canary requests miss feature 5"),
    ]
    rows = []
    for rule, fault, nan_on, what in cases:
        results = [onset_to_rollback(rule, fault, nan_on, seed) for seed in SEEDS]
        bound = results[0][1]
        false_alarms = sum(elapsed is None for elapsed, _ in results)
        times = [elapsed for elapsed, _ in results if elapsed is not None]
        figures = "- | -"
        if times:
            figures = f"{statistics.median(times):.0f} s | {min(times):.0f}-{max(times):.0f} s"
        verdict = "met" if times and max(times) <= bound else "missed"
        if false_alarms:
            verdict += f" ({len(times)} of {len(SEEDS)} seeds measured)"
        rows.append(f"| `{rule}` | {what} | {figures} | {bound} s | {false_alarms} | {verdict} |")
    cpu, ctr_verdicts, incidents = guardian_cpu_per_tick()
    setup = CtrSetup()
    aa = ctr_rollouts(0.05, CTR_RUNS, seed=11, setup=setup)
    power = ctr_rollouts(0.045, CTR_RUNS, seed=12, setup=setup)
    minutes = power.median_at / setup.per_second / 60
    return (
        f"Onset -> rollback: {len(SEEDS)} seeds per rule (seeding the traffic and the injected faults), each after "
        "healthy traffic for the rule's window; median and range over the seeds.\n\n"
        "| rule | onset at t0 | onset -> traffic on stable, median | range | window + one tick "
        "| rollbacks before the onset | |\n"
        "|---|---|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\n"
        f"Guardian CPU per tick, 10 endpoints x 3 versions x 4 rules, windows holding {FILL_SECONDS // 60} minutes, "
        "a Feedback outcome for every request (A/A, CTR 5%), one second of traffic between ticks (not timed): "
        f"**{cpu * 1000:.1f} ms** (median of {TICKS} ticks; a tick is 1 s). "
        f"CTR verdicts with a p-value per timed tick: at least {ctr_verdicts} of 20; "
        f"incidents in the timed ticks: {incidents}.\n\n"
        f"CTR rule through the guardian (`{CTR_RULE}`; {CTR_RUNS} back-to-back 50/50 canaries per figure on one "
        f"gateway; {setup.per_second} outcomes per arm per simulated second into the sliding windows, a guardian "
        f"tick every second, up to {setup.per_arm:,} outcomes per arm = {setup.seconds // 60} minutes per run, "
        f"windows keeping {setup.window_history // 60} minutes): A/A false rollbacks **{aa.rollback_rate:.1%}** "
        f"(alpha 0.05); a 5.0% -> 4.5% drop rolled back in **{power.rollback_rate:.1%}** of runs by "
        f"{setup.per_arm:,} per arm (median {power.median_at:,.0f} per arm at the rollback, "
        f"{minutes:.0f} simulated minutes)."
    )
