"""Guardrails on a simulated clock: the real gateway core, driven one simulated second at a time.

The core is real (onnxruntime, SQLite, windows, guardian).

`sim_gateway` builds it, `drive` sends a second of real requests, and `ctr_rollouts` measures the CTR
rule's A/A false-rollback rate and its power through the guardian itself: business outcomes land in
the sliding windows every second, the guardian ticks every second with the rule as written, and a
rollback is the guardian moving the traffic to stable.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import parse_route_file
from gateway.errors import GatewayError
from gateway.inference import InferRequest
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import SeriesKey, WindowStore
from testkit.gateways import MODELS

#: The CTR guardrail of the playbooks: roll back on a significant drop of more than 5%.
CTR_RULE = "ctr_drop > 5% p < 0.05 for 30m"
ENDPOINT = "ctr-ranker"


def endpoint_yaml(name: str, rules: list[str], traffic: str = '{"1.12": 90, "1.13": 10}') -> str:
    """One endpoint of the demo models (stable 1.12, canary 1.13, 1.14 loaded) with guardrails, as route-file YAML."""
    quoted = ", ".join(f'"{r}"' for r in rules)
    return (
        f'  {name}:\n    versions: ["1.12", "1.13", "1.14"]\n    traffic: {traffic}\n'
        f'    labels: {{stable: "1.12", canary: "1.13"}}\n    guardrails: [{quoted}]\n'
    )


def sim_gateway(
    scratch: Path, route_text: str, clock: SimClock, *, model_root: Path = MODELS, window_history: int = 3600
) -> Gateway:
    """A started gateway core whose windows, feedback, guardian and rollouts all read `clock`.

    The guardian's thread is not started: the caller ticks it (`gateway.guardian.tick()`).
    """
    config = parse_route_file(route_text, base_dir=model_root).model_copy(update={"model_root": model_root})
    telemetry = Telemetry(WindowStore(window_history, clock=clock))
    gateway = Gateway(config, SqliteStore(scratch / "state.db"), telemetry=telemetry, clock=clock)
    gateway.start()
    return gateway


def drive(
    gateway: Gateway,
    clock: SimClock,
    rng: np.random.Generator,
    *,
    endpoint: str = ENDPOINT,
    per_second: int = 50,
    nan_on: str = "",
    nan_feature: int = 5,
    ctr: float = 0.0,
) -> None:
    """One simulated second of requests through the real inference path (the caller moves the clock on).

    Requests that the version `nan_on` serves miss feature `nan_feature`; injected faults fail
    requests (the windows count them). With `ctr`, each served request gets a Feedback outcome.
    """
    routes = gateway.router.table.endpoint(endpoint)
    for i in range(per_second):
        key = f"u{clock.now:.0f}-{i}"
        x = rng.normal(size=(1, 32)).astype(np.float32)
        if nan_on and routes.choose(key).version == nan_on:
            x[0, nan_feature] = np.nan
        with contextlib.suppress(GatewayError):
            result = gateway.inference.infer(InferRequest(endpoint, {"features": x}, routing_key=key))
            if ctr:
                gateway.feedback.feedback(result.request_id, float(rng.random() < ctr))


@dataclass(frozen=True)
class CtrSetup:
    """One simulated experiment of the CTR rule: two arms of equal traffic, outcomes every second."""

    #: Outcomes per arm by the end of a run that does not roll back.
    per_arm: int = 60_000
    #: Outcomes per arm per simulated second (the guardian ticks once a second).
    per_second: int = 25
    stable_ctr: float = 0.05
    rule: str = CTR_RULE
    #: The windows' history (the production default is 30 minutes).
    window_history: int = 1800

    @property
    def seconds(self) -> int:
        """How long a run lasts when it does not roll back."""
        return -(-self.per_arm // self.per_second)


@dataclass
class CtrResult:
    """What the runs did: how many rolled back, and at how many outcomes per arm."""

    runs: int = 0
    detected_at: list[int] = field(default_factory=list)

    @property
    def rollback_rate(self) -> float:
        """Share of runs the guardian rolled back."""
        return len(self.detected_at) / self.runs if self.runs else float("nan")

    @property
    def median_at(self) -> float:
        """Median outcomes per arm when a rollback happened (NaN without one)."""
        return float(statistics.median(self.detected_at)) if self.detected_at else float("nan")


def ctr_rollouts(canary_ctr: float, runs: int, seed: int, setup: CtrSetup | None = None) -> CtrResult:
    """`runs` canaries of 1.13 at 50% (stable 1.12 at `setup.stable_ctr`), one after another on one gateway.

    Each run is a new canary as an operator would start it: the traffic goes to 50/50, the guardian
    ticks (its CTR experiment for the candidate starts counting), and every second both arms get
    `per_second` outcomes, the clicks drawn at their rates, recorded in the candidate's and stable's
    sliding windows (where the Feedback join puts them), followed by one guardian tick. The run ends
    when the guardian has moved all traffic to stable, or after `per_arm` outcomes per arm; then the
    traffic goes to 100% stable for a tick, so the next run's experiment starts afresh.
    """
    setup = setup or CtrSetup()
    clock = SimClock()
    rng = np.random.default_rng(seed)
    result = CtrResult()
    route_text = "endpoints:\n" + endpoint_yaml(ENDPOINT, [setup.rule], traffic='{"1.12": 100}')
    with tempfile.TemporaryDirectory(prefix="ctr-sim-") as scratch:
        gateway = sim_gateway(Path(scratch), route_text, clock, window_history=setup.window_history)
        try:
            windows = gateway.telemetry.windows
            rates = {"1.13": canary_ctr, "1.12": setup.stable_ctr}
            arms = [(windows.window(SeriesKey(ENDPOINT, version)), ctr) for version, ctr in rates.items()]
            control = gateway.control
            for run in range(runs):
                control.set_traffic("operator", ENDPOINT, {"1.12": 50, "1.13": 50}, reason=f"canary run {run}")
                gateway.guardian.tick()
                for second in range(1, setup.seconds + 1):
                    for window, ctr in arms:
                        clicks = int(rng.binomial(setup.per_second, ctr))
                        for outcome in (1.0,) * clicks + (0.0,) * (setup.per_second - clicks):
                            window.record_outcome(outcome)
                    clock.advance(1)
                    gateway.guardian.tick()
                    if control.state.endpoint(ENDPOINT).weights.get("1.13", 0) == 0:
                        result.detected_at.append(second * setup.per_second)
                        break
                else:
                    control.set_traffic("operator", ENDPOINT, {"1.12": 100}, reason=f"end of run {run}")
                    gateway.guardian.tick()
                result.runs += 1
        finally:
            gateway.close()
    return result
