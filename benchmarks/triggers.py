"""Issue 17's figures: what the new triggers cost on the request path, and how the value test behaves.

All in-process, on the real gateway core (onnxruntime, SQLite, windows, histograms, guardian):

- drift histograms on the request path: `InferenceService.infer` on the demo model (32 float
  features, batch 1 and batch 16) with the endpoint's drift histograms counting vs not
  tracked, alternating rounds, median microseconds per request; and `DriftTracker.observe`
  alone.
- value_drop through the guardian: a SimClock, one guardian tick per simulated second, real
  sliding windows fed with Feedback values, the real rule `value_drop > 3% p < 0.05 for 30m`
  on a 50/50 split; the share of simulated rollouts that roll back when both arms earn the
  same (A/A) and when the canary earns 10% less per request (power), with the median values
  per arm at detection. Values: 12% of requests convert, a conversion's value is lognormal
  (sigma 0.5, and a heavier sigma 1.0 for A/A).
- onset -> rollback for feature_drift (a unit change on the canary's feature 3) and
  memory_growth (a fake resident-memory reader growing 1 MB/s after the onset).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.app import Gateway
from gateway.clock import SimClock
from gateway.desired import parse_route_file
from gateway.errors import GatewayError
from gateway.inference import InferRequest
from gateway.orchestration.guardian import Guardian
from gateway.state.sqlite import SqliteStore
from gateway.telemetry.drift import DriftTracker
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import SeriesKey, WindowStore
from testkit.gateways import MODELS

VALUE_RULE = "value_drop > 3% p < 0.05 for 30m"
RUNS, SECONDS, PER_SECOND = 200, 900, 40  # value test: rollouts, simulated seconds each, values per arm per second


def _gateway(scratch: Path, clock: SimClock, rules: list[str], memory: Callable[[], int] | None = None) -> Gateway:
    quoted = ", ".join(f'"{r}"' for r in rules)
    text = (
        f"model_root: {MODELS}\nendpoints:\n  ctr-ranker:\n"
        '    versions: ["1.12", "1.13", "1.14"]\n    traffic: {"1.12": 50, "1.13": 50}\n'
        f'    labels: {{stable: "1.12", canary: "1.13"}}\n    guardrails: [{quoted}]\n'
    )
    config = parse_route_file(text, base_dir=MODELS)
    reader = memory or (lambda: 0)
    telemetry = Telemetry(WindowStore(3600, clock=clock), memory=MemoryWindow(3600, clock=clock, reader=reader))
    gateway = Gateway(config, SqliteStore(scratch / "state.db"), telemetry=telemetry, clock=clock)
    gateway.start()
    return gateway


# --- the request path -----------------------------------------------------------------------------


def request_path_cost(rounds: int = 30, requests: int = 500) -> dict[str, float]:
    """Median (and lowest) CPU us per request of `infer` with and without drift histograms, batch 1
    and 16, and of `DriftTracker.observe` alone.

    Two endpoints serve the same model side by side; only `tracked` counts histograms (its bins
    placed from stable's traffic first), so switching costs nothing between rounds. The thread's
    CPU time, not wall time: on a shared machine wall time mostly measures the neighbours.
    """
    clock = SimClock()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        for name in ("tracked", "plain"):
            shutil.copytree(MODELS / "ctr-ranker", root / name)
        endpoint = (
            '    versions: ["1.12", "1.13"]\n    traffic: {"1.12": 50, "1.13": 50}\n'
            '    labels: {stable: "1.12", canary: "1.13"}\n'
        )
        text = f"model_root: {root}\nendpoints:\n  tracked:\n{endpoint}  plain:\n{endpoint}"
        telemetry = Telemetry(WindowStore(3600, clock=clock))
        gateway = Gateway(parse_route_file(text, base_dir=root), SqliteStore(Path(scratch) / "state.db"),
                          telemetry=telemetry, clock=clock)  # fmt: skip
        gateway.start()
        try:
            drift = gateway.telemetry.drift
            drift.track(["tracked"])
            rng = np.random.default_rng(1)
            for i in range(3000):  # place the bins from stable's traffic (half of it)
                x = rng.normal(size=(1, 32)).astype(np.float32)
                gateway.inference.infer(InferRequest("tracked", {"features": x}, routing_key=f"w{i}"))
            assert not drift.status("tracked"), drift.status("tracked")
            rows = {1: rng.normal(size=(1, 32)).astype(np.float32), 16: rng.normal(size=(16, 32)).astype(np.float32)}
            samples: dict[str, list[float]] = {}
            for _ in range(rounds):
                for batch in (1, 16):
                    for name in ("plain", "tracked"):
                        request = InferRequest(name, {"features": rows[batch]}, routing_key="user-7")
                        started = time.thread_time()
                        for _ in range(requests):
                            gateway.inference.infer(request)
                        per = (time.thread_time() - started) / requests * 1e6
                        samples.setdefault(f"{batch} {'on' if name == 'tracked' else 'off'}", []).append(per)
            tracker = DriftTracker(1800, clock=clock, warmup_rows=100)
            tracker.track(["ep"])
            inputs = (("features", 32),)
            score = np.array([[0.03]], dtype=np.float32)
            for _ in range(100):
                tracker.observe("ep", "1", "stable", inputs, {"features": rng.normal(size=(1, 32))}, score)
            for _ in range(rounds):
                started = time.thread_time()
                for _ in range(requests):
                    tracker.observe("ep", "2", "canary", inputs, {"features": rows[1]}, score)
                samples.setdefault("observe", []).append((time.thread_time() - started) / requests * 1e6)
        finally:
            gateway.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return medians | {f"{name} min": min(values) for name, values in samples.items()}


# --- value_drop through the guardian ----------------------------------------------------------------


def value_rollouts(
    drop: float,
    seed: int,
    *,
    runs: int = RUNS,
    seconds: int = SECONDS,
    per_second: int = PER_SECOND,
    sigma: float = 0.5,
) -> tuple[float, float]:
    """Share of simulated rollouts the guardian rolls back on `VALUE_RULE`, and the median values per arm at detection.

    Each run is a fresh guardian (a fresh sequential test) over the same gateway; every simulated
    second each arm gets `per_second` Feedback values, then the clock moves and the guardian ticks.
    """
    clock = SimClock()
    rng = np.random.default_rng(seed)
    fired, when = 0, []
    with tempfile.TemporaryDirectory() as scratch:
        gateway = _gateway(Path(scratch), clock, [VALUE_RULE])
        windows = gateway.telemetry.windows
        canary, stable = (
            windows.window(SeriesKey("ctr-ranker", "1.13")),
            windows.window(SeriesKey("ctr-ranker", "1.12")),
        )
        try:
            for _ in range(runs):
                guardian = Guardian(
                    gateway.control,
                    windows,
                    gateway.registry,
                    gateway.rollouts,
                    gateway.incidents,
                    clock=clock,
                    memory=gateway.telemetry.memory,
                )
                guardian.tick()  # the run's experiment starts here
                start = canary.value_totals().n
                for _ in range(seconds):
                    for window, factor in ((canary, 1 - drop), (stable, 1.0)):
                        converted = rng.random(per_second) < 0.12
                        values = np.where(converted, rng.lognormal(3.0, sigma, per_second) * factor, 0.0)
                        for converted_one, value in zip(converted.tolist(), values.tolist(), strict=True):
                            window.record_outcome(float(converted_one), value)
                    clock.advance(1)
                    if guardian.tick().incidents:
                        fired += 1
                        when.append(canary.value_totals().n - start)
                        gateway.control.set_traffic("bench", "ctr-ranker", {"1.12": 50, "1.13": 50}, reason="next run")
                        break
        finally:
            gateway.close()
    return fired / runs, float(np.median(when)) if when else float("nan")


# --- onset -> rollback ----------------------------------------------------------------------------------


def onset_to_rollback(rule: str, seed: int) -> tuple[float | None, float]:
    """Simulated seconds from the onset to the rollback (None: rolled back before the onset)."""
    clock = SimClock()
    rng = np.random.default_rng(seed)
    random.seed(seed)
    growing = [False]
    rss = [400_000_000]

    def memory() -> int:
        if growing[0]:
            rss[0] += 1_000_000
        return rss[0]

    with tempfile.TemporaryDirectory() as scratch:
        gateway = _gateway(Path(scratch), clock, [rule], memory)
        onset = None
        try:
            window = gateway.control.state.endpoint("ctr-ranker").guardrails.rules[0].window_seconds
            for second in range(window * 4):
                if second == window:  # healthy for one window (bins placed, histograms full), then the onset
                    onset = clock.now
                    growing[0] = True
                routes = gateway.router.table.endpoint("ctr-ranker")
                for i in range(20):
                    key = f"u{second}-{i}"
                    x = rng.normal(size=(1, 32)).astype(np.float32)
                    if onset is not None and routes.choose(key).version == "1.13":
                        x[0, 3] *= 100
                    with contextlib.suppress(GatewayError):
                        gateway.inference.infer(InferRequest("ctr-ranker", {"features": x}, routing_key=key))
                clock.advance(1)
                if gateway.guardian.tick().incidents:
                    return (None if onset is None else clock.now - onset), window
        finally:
            gateway.close()
    return float("inf"), window


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    del seconds, concurrencies
    cost = request_path_cost(rounds=max(rounds, 30))
    aa, _ = value_rollouts(0.0, seed=31)
    aa_heavy, _ = value_rollouts(0.0, seed=32, sigma=1.0)
    power, median = value_rollouts(0.10, seed=33)
    onsets = []
    for rule, what in (
        ("feature_drift[any] > 0.2 psi for 10m", "canary's feature 3 arrives x100 (a unit change)"),
        ("memory_growth > 200MB for 10m", "resident memory grows 1 MB/s"),
    ):
        results = [onset_to_rollback(rule, seed) for seed in (1, 2, 3)]
        times = [t for t, _ in results if t is not None]
        early = sum(t is None for t, _ in results)
        onsets.append(
            f"| `{rule}` | {what} | {statistics.median(times):.0f} s | {min(times):.0f}-{max(times):.0f} s | {early} |"
        )
    return (
        "Request path, `InferenceService.infer` in-process on the demo model (32 float features), "
        "thread CPU us per request, median (and lowest) over alternating rounds of 500 requests:\n\n"
        "| batch | drift histograms off | on | extra per request | `DriftTracker.observe` alone |\n"
        "|---:|---:|---:|---:|---:|\n"
        f"| 1 | {cost['1 off']:.1f} | {cost['1 on']:.1f} | {cost['1 on'] - cost['1 off']:+.1f} | "
        f"{cost['observe']:.1f} |\n"
        f"| 16 | {cost['16 off']:.1f} | {cost['16 on']:.1f} | {cost['16 on'] - cost['16 off']:+.1f} | |\n"
        f"| 1 (lowest round) | {cost['1 off min']:.1f} | {cost['1 on min']:.1f} | "
        f"{cost['1 on min'] - cost['1 off min']:+.1f} | {cost['observe min']:.1f} |\n"
        f"| 16 (lowest round) | {cost['16 off min']:.1f} | {cost['16 on min']:.1f} | "
        f"{cost['16 on min'] - cost['16 off min']:+.1f} | |\n\n"
        f"`{VALUE_RULE}` through the guardian ({RUNS} simulated rollouts each, {SECONDS} guardian ticks of one "
        f"simulated second, {PER_SECOND} values per arm per second, 12% of requests convert with a lognormal "
        f"value): A/A false rollbacks **{aa:.1%}** (sigma 0.5) and **{aa_heavy:.1%}** (sigma 1.0) at alpha 0.05; "
        f"a 10% drop of value per request detected in **{power:.1%}** of runs within {SECONDS * PER_SECOND:,} "
        f"values per arm (median {median:,.0f} per arm at detection).\n\n"
        "Onset -> rollback (SimClock, 20 requests per second split 50/50, healthy for one window first; 3 seeds):\n\n"
        "| rule | onset at t0 | median | range | rollbacks before the onset |\n|---|---|---:|---:|---:|\n"
        + "\n".join(onsets)
    )
