"""Issue 6's figures: breach onset to rollback, the guardian's CPU per tick, and the CTR test.

All on a simulated clock with the real gateway core (onnxruntime, SQLite, windows, guardian):

- onset -> rollback: traffic flows at 50 requests per simulated second (10% to the canary),
  healthy for the rule's window first; at t0 the canary starts failing, slowing down or
  sending missing features; the guardian ticks every simulated second; the figure is the
  simulated time until traffic is back on stable, against the rule's window + one tick;
  5 seeds (traffic and `random`, which the fault injector draws from), median and range.
- guardian CPU per tick: 10 endpoints x 3 versions, 4 rules each, windows filled for 30
  minutes with Feedback outcomes for every request; process CPU time per tick, median of 50
  ticks, one simulated second of traffic between ticks (outside the timed region).
- the CTR test: the A/A false-rollback rate and the power for 5.0% -> 4.5% by 60,000 per arm.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import parse_route_file
from gateway.errors import GatewayError
from gateway.faults import Fault
from gateway.guardrails.rules import parse_rule
from gateway.guardrails.sequential import SequentialDropTest
from gateway.inference import InferRequest
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import WindowStore
from testkit.gateways import MODELS

SEEDS = (1, 2, 3, 4, 5)
CTR_RULE = "ctr_drop > 5% p < 0.05 for 30m"
FILL_SECONDS, TICKS = 1800, 50  # guardian CPU: simulated seconds of traffic before the timed ticks, timed ticks
RUNS, PER_ARM, PER_TICK = 200, 60_000, 500  # CTR simulation: rollouts, outcomes per arm, outcomes between looks


def _gateway(scratch: Path, text: str, clock: SimClock, root: Path = MODELS) -> Gateway:
    config = parse_route_file(text, base_dir=root).model_copy(update={"model_root": root})
    gateway = Gateway(
        config, SqliteStore(scratch / "state.db"), telemetry=Telemetry(WindowStore(3600, clock=clock)), clock=clock
    )
    gateway.start()
    return gateway


def _endpoint(name: str, rules: list[str], traffic: str = '{"1.12": 90, "1.13": 10}') -> str:
    quoted = ", ".join(f'"{r}"' for r in rules)
    return (
        f'  {name}:\n    versions: ["1.12", "1.13", "1.14"]\n    traffic: {traffic}\n'
        f'    labels: {{stable: "1.12", canary: "1.13"}}\n    guardrails: [{quoted}]\n'
    )


def _drive(
    gateway: Gateway, clock: SimClock, endpoint: str, rng: np.random.Generator, nan_on: str = "", ctr: float = 0.0
) -> None:
    """One simulated second of traffic (50 requests); with `ctr`, each request gets a Feedback outcome."""
    routes = gateway.router.table.endpoint(endpoint)
    for i in range(50):
        key = f"u{clock.now:.0f}-{i}"
        x = rng.normal(size=(1, 32)).astype(np.float32)
        if nan_on and routes.choose(key).version == nan_on:
            x[0, 5] = np.nan
        with contextlib.suppress(GatewayError):
            result = gateway.inference.infer(InferRequest(endpoint, {"features": x}, routing_key=key))
            if ctr:
                gateway.feedback.feedback(result.request_id, float(rng.random() < ctr))


def _weights(gateway: Gateway) -> dict[str, int]:
    return dict(gateway.control.state.endpoint("ctr-ranker").weights)


def onset_to_rollback(rule: str, fault: Fault | None, nan_on: str, seed: int) -> tuple[float | None, int]:
    """Simulated seconds from the onset to the rollback (None: it rolled back on healthy traffic, before
    the onset), and the rule's window + one tick. Healthy traffic fills the longest window first."""
    clock = SimClock()
    rng = np.random.default_rng(seed)
    random.seed(seed)  # gateway.faults draws injected errors from `random`
    with tempfile.TemporaryDirectory() as scratch:
        gateway = _gateway(Path(scratch), f"endpoints:\n{_endpoint('ctr-ranker', [rule])}", clock)
        try:
            before = _weights(gateway)
            rules = gateway.control.state.endpoint("ctr-ranker").guardrails
            for _ in range(max(r.window_seconds for r in rules.rules)):  # healthy traffic fills every window
                _drive(gateway, clock, "ctr-ranker", rng)
                clock.advance(1)
                gateway.guardian.tick()
            if _weights(gateway) != before:
                return None, rules.rules[0].window_seconds + 1
            if fault is not None:
                gateway.control.set_fault("bench", "ctr-ranker", "1.13", fault, reason="onset")
            onset = clock.now
            window = rules.rules[0].window_seconds
            while clock.now - onset < window * 3:
                _drive(gateway, clock, "ctr-ranker", rng, nan_on)
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
            _endpoint(f"ep-{i}", rules, '{"1.12": 80, "1.13": 10, "1.14": 10}') for i in range(10)
        )
        gateway = _gateway(Path(scratch), text, clock, root)
        try:

            def second() -> None:
                for i in range(10):
                    _drive(gateway, clock, f"ep-{i}", rng, ctr=0.05)
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


def ctr_rollouts(canary_ctr: float, seed: int) -> tuple[float, float]:
    """Simulated rollouts of the CTR rule's sequential test (stable at 5%): the share that roll back
    (p below the rule's alpha and a drop above its threshold, looked at every PER_TICK outcomes per
    arm up to PER_ARM), and the median outcomes per arm at detection."""
    rule = parse_rule(CTR_RULE)
    assert rule.alpha is not None
    rng = np.random.default_rng(seed)
    fired, when = 0, []
    for _ in range(RUNS):
        test = SequentialDropTest()
        canary = stable = n = 0
        while n < PER_ARM:
            canary += rng.binomial(PER_TICK, canary_ctr)
            stable += rng.binomial(PER_TICK, 0.05)
            n += PER_TICK
            result = test.update(canary, n, stable, n)
            if result.p_value < rule.alpha and result.relative_drop > rule.threshold:
                fired += 1
                when.append(n)
                break
    return fired / RUNS, float(np.median(when)) if when else float("nan")


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
    aa, _ = ctr_rollouts(0.05, seed=11)
    power, median = ctr_rollouts(0.045, seed=12)
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
        f"CTR test (`{CTR_RULE}`, {RUNS} simulated rollouts each, looked at every {PER_TICK} outcomes per arm): "
        f"A/A false rollbacks **{aa:.1%}** (alpha 0.05); a 5.0% -> 4.5% drop detected in **{power:.1%}** of runs "
        f"by {PER_ARM:,} per arm (median {median:.0f} per arm at detection)."
    )
