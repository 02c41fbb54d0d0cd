"""Game day: the release playbooks' worked examples, played end to end at a compressed time scale.

A real gateway (gRPC on free ports, SQLite in a scratch directory, the bundled models) runs
on a simulated clock; a simulated population of users calls Predict through real channels,
clicks with the probability the served model's score gives (times a boost, so effects show
in minutes of simulated traffic), and reports clicks through Feedback. Every simulated second
the guardian ticks. Scenarios:

  a. a canary that lowers CTR             -> automatic rollback on the CTR guardrail
  b. a feature null-rate spike on a canary -> rollback on the null-rate guardrail
  c. an error-rate fault on the canary    -> rollback on the error-rate guardrail
  d. a clean canary ramps 5 -> 100%       -> promoted to stable
  e. an upstream feature shift on a canary's inputs (a unit change, no nulls)
                                          -> rollback on the feature drift guardrail
  f. revenue per request drops, CTR flat  -> rollback on the value guardrail (the CTR one stays quiet)

Each prints a timeline and its incident notes; the run fails when an expected outcome did not
happen.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import DesiredState, parse_route_file
from gateway.faults import Fault
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.routing import format_traffic
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import WindowStore

MODELS = Path(__file__).resolve().parents[2] / "models"
ENDPOINT = "ctr-ranker"


@dataclass(frozen=True)
class RolloutPlan:
    """A progressive rollout a scenario starts."""

    version: str
    steps: list[int]
    step_seconds: float
    rules: list[str]


@dataclass
class Scenario:
    """One playbook example: starting routes, what goes wrong, and what must happen."""

    name: str
    title: str
    traffic: dict[str, int]
    guardrails: list[str]
    expect: str  # "rollback" or "promote"
    max_seconds: int
    setup: Callable[[Gateway], object] | None = None
    nan_on: str = ""  # a version whose requests carry a missing feature
    rollout: RolloutPlan | None = None
    shift_on: str = ""  # a version whose requests carry feature 3 in other units (x100)
    click_rate: float = 0.0  # clicks at this rate on every version (0: from the served score)
    value_factor: dict[str, float] | None = None  # revenue per click by version (None: no values sent)
    fired_by: str = ""  # the metric whose rule must be the one that breached (the others stay quiet)


@dataclass
class Outcome:
    """What a scenario did."""

    scenario: Scenario
    passed: bool
    seconds: int
    timeline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def scenarios() -> list[Scenario]:
    """The worked examples, with the playbooks' thresholds (windows sized to the simulation)."""
    return [
        Scenario(
            "a",
            "canary 1.13 lowers CTR (A/B at 50%)",
            {"1.12": 50, "1.13": 50},
            ["ctr_drop > 5% p < 0.05 for 30m min 200", "error_rate > 2% for 5m min 100"],
            "rollback",
            1800,
            fired_by="ctr_drop",
        ),
        Scenario(
            "b",
            "feature null-rate spike on canary 1.14",
            {"1.12": 80, "1.14": 20},
            ["feature_null_rate_delta > 1pt for 10m min 200"],
            "rollback",
            900,
            fired_by="feature_null_rate_delta",
            nan_on="1.14",
        ),
        Scenario(
            "c",
            "error-rate fault on canary 1.13 (10% of its requests fail)",
            {"1.12": 90, "1.13": 10},
            ["error_rate > 2% for 5m min 50"],
            "rollback",
            900,
            fired_by="error_rate",
            setup=lambda g: g.control.set_fault(
                "gameday", ENDPOINT, "1.13", Fault(error_rate=0.1), reason="game day: inject errors"
            ),
        ),
        Scenario(
            "d",
            "clean canary 1.14 ramps 5 -> 25 -> 50 -> 100% and is promoted",
            {"1.12": 100},
            [],
            "promote",
            1200,
            rollout=RolloutPlan(
                "1.14",
                [5, 25, 50, 100],
                120,
                [
                    "error_rate > 2% for 2m min 50",
                    "latency_p95_ratio > 3 for 2m min 50",
                    "feature_null_rate_delta > 1pt for 2m min 50",
                ],
            ),
        ),
        Scenario(
            "e",
            "upstream feature shift on canary 1.14's inputs (feature 3 in cents, no nulls)",
            {"1.12": 80, "1.14": 20},
            ["feature_drift[any] > 0.2 psi for 10m", "feature_null_rate_delta > 1pt for 10m min 200"],
            "rollback",
            900,
            fired_by="feature_drift",
            shift_on="1.14",
        ),
        Scenario(
            "f",
            "canary 1.13 earns 20% less revenue per click, CTR flat (A/B at 50%)",
            {"1.12": 50, "1.13": 50},
            ["ctr_drop > 5% p < 0.05 for 30m", "value_drop > 3% p < 0.05 for 30m"],
            "rollback",
            1800,
            fired_by="value_drop",
            click_rate=0.12,
            value_factor={"1.12": 1.0, "1.13": 0.8},
        ),
    ]


def _route_file(traffic: dict[str, int], guardrails: list[str]) -> str:
    rules = "[" + ", ".join(f'"{r}"' for r in guardrails) + "]"
    weights = "{" + ", ".join(f'"{v}": {w}' for v, w in traffic.items()) + "}"
    return (
        f"model_root: {MODELS}\nendpoints:\n  {ENDPOINT}:\n"
        f'    versions: ["1.12", "1.13", "1.14"]\n    traffic: {weights}\n'
        f'    labels: {{stable: "1.12"}}\n    guardrails: {rules}\n'
    )


class Population:
    """Simulated users: fixed features per user, clicks drawn from the served score."""

    def __init__(self, users: int, click_boost: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.features = self.rng.normal(size=(users, 32)).astype(np.float32)
        self.keys = [f"user-{i}" for i in range(users)]
        self.click_boost = click_boost

    def request(self, user: int, nan_feature: bool, shifted: bool = False) -> gw.PredictRequest:
        """A user's Predict (with feature 7 missing when `nan_feature`, feature 3 x100 when `shifted`)."""
        row = self.features[user : user + 1].copy()
        if nan_feature:
            row[0, 7] = np.nan
        if shifted:
            row[0, 3] *= 100
        return gw.PredictRequest(
            model=ENDPOINT,
            routing_key=self.keys[user],
            inputs=[gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[1, 32], data=row.tobytes())],
        )

    def clicks(self, score: float, rate: float = 0.0) -> bool:
        """Whether the user clicks, given the served score (or at a fixed `rate`)."""
        return bool(self.rng.random() < (rate or min(1.0, score * self.click_boost)))

    def revenue(self) -> float:
        """What a click earns (lognormal, median about 20)."""
        return float(self.rng.lognormal(3.0, 0.5))


async def _second(
    stub: gw_grpc.InferenceStub, population: Population, gateway: Gateway, scenario: Scenario, rate: int
) -> tuple[int, int]:
    """One simulated second of traffic: `rate` users call Predict and report clicks. Returns (ok, failed)."""
    table = gateway.router.table.endpoint(ENDPOINT)
    users = population.rng.integers(0, len(population.keys), size=rate)
    calls = []
    for user in users:
        version = table.choose(population.keys[user]).version
        nan = version == scenario.nan_on and population.rng.random() < 0.05
        calls.append(stub.Predict(population.request(int(user), nan, version == scenario.shift_on), timeout=10))
    results = await asyncio.gather(*calls, return_exceptions=True)
    feedback, failed = [], 0
    for result in results:
        if isinstance(result, BaseException):
            failed += 1
            continue
        score = float(np.frombuffer(result.outputs[0].data, dtype="<f4")[0])
        clicked = population.clicks(score, scenario.click_rate)
        request = gw.FeedbackRequest(request_id=result.request_id, outcome=float(clicked))
        if scenario.value_factor is not None:
            request.value = population.revenue() * scenario.value_factor.get(result.version, 1.0) if clicked else 0.0
        feedback.append(stub.Feedback(request, timeout=10))
    await asyncio.gather(*feedback)
    return len(results) - failed, failed


def _traffic(state: DesiredState) -> str:
    return format_traffic(state.endpoint(ENDPOINT).weights)


async def play(scenario: Scenario, *, rate: int = 40, click_boost: float = 4.0, seed: int = 7) -> Outcome:
    """Run one scenario on its own gateway; returns the outcome."""
    from gateway.grpc.server import start_inference_server

    clock = SimClock()
    outcome = Outcome(scenario, False, 0)
    with tempfile.TemporaryDirectory() as scratch:
        config = parse_route_file(_route_file(scenario.traffic, scenario.guardrails), base_dir=MODELS)
        telemetry = Telemetry(WindowStore(3600, clock=clock))
        gateway = Gateway(config, SqliteStore(Path(scratch) / "state.db"), telemetry=telemetry, clock=clock)
        gateway.start()
        server = await start_inference_server(gateway, "127.0.0.1:0")
        try:
            if scenario.setup:
                scenario.setup(gateway)
            if scenario.rollout:
                plan = scenario.rollout
                gateway.rollouts.start(
                    "gameday",
                    ENDPOINT,
                    plan.version,
                    steps=plan.steps,
                    step_seconds=plan.step_seconds,
                    rules=plan.rules,
                    reason="game day: clean canary",
                )
            outcome.timeline.append(f"t=0s  routes: {_traffic(gateway.control.state)}  ({scenario.title})")
            population = Population(5000, click_boost, seed)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = gw_grpc.InferenceStub(channel)
                served = failed = 0
                for second in range(1, scenario.max_seconds + 1):
                    ok, bad = await _second(stub, population, gateway, scenario, rate)
                    served, failed = served + ok, failed + bad
                    clock.advance(1.0)
                    report = await asyncio.to_thread(gateway.guardian.tick)
                    for incident in report.incidents:
                        outcome.timeline.append(f"t={second}s  INCIDENT {incident.id}: {incident.outcome}")
                        outcome.notes.append(incident.to_markdown())
                    rollout = gateway.rollouts.get(ENDPOINT)
                    last = rollout.history[-1] if rollout and rollout.history else None
                    if last and last["at"] == clock.now and last["event"].startswith(("advanced", "promoted")):
                        outcome.timeline.append(f"t={second}s  rollout: {last['event']}")
                    if _done(gateway, scenario):
                        outcome.seconds = second
                        break
                outcome.timeline.append(
                    f"t={outcome.seconds or scenario.max_seconds}s  routes: {_traffic(gateway.control.state)}; "
                    f"{served} requests served, {failed} failed (injected)"
                )
            outcome.passed = _done(gateway, scenario)
        finally:
            await server.stop(0.5)
            gateway.close()
    return outcome


def _done(gateway: Gateway, scenario: Scenario) -> bool:
    ep = gateway.control.state.endpoint(ENDPOINT)
    if scenario.expect == "rollback":
        incidents = gateway.incidents.list(ENDPOINT)
        fired = {v["metric"] for incident in incidents for v in incident.breached}
        return dict(ep.weights) == {"1.12": 100} and bool(incidents) and fired == {scenario.fired_by}
    return ep.labels.get("stable") == "1.14" and dict(ep.weights) == {"1.14": 100}


def run(names: str = "abcdef", *, rate: int = 40, click_boost: float = 4.0, seed: int | None = None) -> list[Outcome]:
    """Play the chosen scenarios in order."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    return [asyncio.run(play(s, rate=rate, click_boost=click_boost, seed=seed)) for s in scenarios() if s.name in names]
