"""Issue 15's benchmarks: the guardian leader's cost per tick, and breach -> fleet-wide rollback.

- **Leader per tick**: 1, 3 and 10 simulated processes (real `WindowStore`s on one simulated
  clock), each serving 50 requests a second (45 stable, 5 canary; 32 features with NaNs, an
  outcome for half). Each tick (one simulated second) the leader pulls every process's new
  seconds through the real wire format (`PullWindows` responses serialised and parsed, as the
  gRPC call carries them), adds them into its windows, and evaluates the demo's four rules on
  them. Reported per tick: the leader's CPU to parse and merge, to evaluate, the bytes pulled,
  and the members' CPU to export and serialise (spread over them). Also the first tick of a
  new leader, which pulls every process's 30 minutes of history at once. Then the same with
  two drift rules on: every process also counts its rows and scores into drift histograms on
  the fleet's bins, and the leader adds up their finished 10-second slots and evaluates
  `feature_drift[any]` and `score_drift` on them, beside the run without.
- **Breach -> rollback**: 3 `gateway serve` processes on one etcd, 50/50 canary, closed-loop
  traffic on all three, rule `error_rate > 20% for 5s min 20`, the default 1 s guardian tick.
  The clock starts when `SetFault(1.13, error_rate=1)` returns (through one process) and stops
  when every process serves the guardian's rollback (a Predict carries its revision). Each
  trial starts from a clean window.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import ADMIN_METADATA, admin_target, start_gateway
from benchmarks.loadgen import request
from gateway.clock import SimClock
from gateway.grpc.fleet import pulled, window_counts
from gateway.guardrails.rules import RuleSet
from gateway.orchestration.evaluate import evaluate
from gateway.orchestration.fleet import Member
from gateway.orchestration.fleet_windows import FleetWindows, Pulled
from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import fleet_pb2 as fleet_pb
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.telemetry.drift import DriftBins, DriftTracker
from gateway.telemetry.windows import SeriesKey, WindowStore

STABLE, CANARY = SeriesKey("ctr-ranker", "1.12"), SeriesKey("ctr-ranker", "1.13")
RULES = RuleSet.parse(
    [
        "error_rate > 2% for 5m min 500",
        "latency_p95_ratio > 1.3 for 10m",
        "ctr_drop > 5% p < 0.05 for 30m",
        "feature_null_rate_delta > 1pt for 10m",
    ]
)
DRIFT_RULES = RuleSet.parse(["feature_drift[any] > 0.2 psi for 10m", "score_drift > 0.1 ks for 10m"])
FEATURES = 32
INPUTS = (("features", FEATURES),)
RATE = 50  # requests per simulated process-second
HORIZON = 1800
TICKS = 60


_ROWS = np.random.default_rng(0).normal(size=(4096, 1, FEATURES)).astype(np.float32)
_SCORES = np.random.default_rng(1).random(size=(4096, 1, 1)).astype(np.float32)
#: The fleet's bins (what every process adopts from the store), placed on a sample like the traffic.
BINS = DriftBins.from_sample(_ROWS[:2000, 0], _SCORES[:2000, 0, 0], "bench")


def _tracker(clock: SimClock) -> DriftTracker:
    tracker = DriftTracker(HORIZON, clock=clock)
    tracker.set_references({"ctr-ranker": BINS})
    tracker.track(["ctr-ranker"])
    return tracker


class _Process:
    """One simulated gateway process: its windows (and drift histograms) and the traffic it records each second."""

    def __init__(self, index: int, clock: SimClock, rng: random.Random, *, drift: bool) -> None:
        self.member = Member(f"p{index}", f"sim {index}", f"sim:{index}", 0.0)
        self.windows = WindowStore(HORIZON, clock=clock)
        self.drift = _tracker(clock) if drift else None
        self._rng = rng
        self._clock = clock
        self.cpu = 0.0
        self._row = index * 97

    def second(self) -> None:
        rng, base = self._rng, self._clock.now
        for i in range(RATE):
            self._clock.now = base + i / RATE
            key = CANARY if i % 10 == 0 else STABLE
            code = "INTERNAL" if rng.random() < 0.005 else "OK"
            nan = [1 if rng.random() < 0.01 else 0 for _ in range(FEATURES)]
            self.windows.window(key, FEATURES).record(rng.lognormvariate(-6.5, 0.4), code, 1, nan)
            if i % 2 == 0:
                self.windows.window(key).record_outcome(1.0 if rng.random() < 0.05 else 0.0)
            if self.drift is not None:
                self._row = (self._row + 1) % len(_ROWS)
                arm = "canary" if key is CANARY else "stable"
                inputs = {"features": _ROWS[self._row]}
                self.drift.observe("ctr-ranker", key.version, arm, INPUTS, inputs, _SCORES[self._row])
        self._clock.now = base

    def answer(self, since: int) -> bytes:
        started = time.process_time()
        now, series = self.windows.export(since)
        histograms = self.drift.export(since) if self.drift is not None else None
        wire = window_counts(now, series, (), histograms).SerializeToString()
        self.cpu += time.process_time() - started
        return wire


def _leader(count: int, *, drift: bool = False) -> dict[str, float]:
    clock = SimClock(1_800_000_000.0)
    rng = random.Random(count)
    processes = [_Process(i, clock, rng, drift=drift) for i in range(count)]
    leader_windows = WindowStore(HORIZON, clock=clock)
    by_id = {p.member.id: p for p in processes}

    def puller(asks: Sequence[tuple[Member, int]]) -> list[Pulled | None]:
        return [pulled(fleet_pb.WindowCounts.FromString(by_id[m.id].answer(since))) for m, since in asks]

    def evaluate_all(windows: WindowStore) -> None:
        for rule in RULES.canary_rules:
            c = windows.window(CANARY).stats(rule.window_seconds)
            b = windows.window(STABLE).stats(rule.window_seconds)
            evaluate(rule, "1.13", "1.12", c, b)
        if fleet.histograms is None:
            return
        for rule in DRIFT_RULES.canary_rules:
            c = windows.window(CANARY).stats(rule.window_seconds)
            b = windows.window(STABLE).stats(rule.window_seconds)
            pair = tuple(fleet.histograms.window("ctr-ranker", v, rule.window_seconds) for v in ("1.13", "1.12"))
            verdict = evaluate(rule, "1.13", "1.12", c, b, histograms=pair)  # type: ignore[arg-type]
            assert verdict.samples, verdict.detail

    # 30 minutes of history, then a new leader's first tick pulls all of it.
    for _ in range(HORIZON):
        for process in processes:
            process.second()
        clock.advance(1)
    fleet = FleetWindows(leader_windows, "leader", puller, drift=_tracker(clock) if drift else None)
    members = [p.member for p in processes]
    first = fleet.refresh(members)
    for process in processes:
        process.cpu = 0.0
    merge, judge, size = [], [], []
    for _ in range(TICKS):
        for process in processes:
            process.second()
        clock.advance(1)
        refresh = fleet.refresh(members)
        started = time.process_time()
        evaluate_all(fleet.merged)
        judge.append(time.process_time() - started)
        merge.append(refresh.cpu_seconds)
        size.append(refresh.size)
    exported = sum(p.cpu for p in processes) / TICKS
    return {
        "merge_ms": statistics.median(merge) * 1000,
        "merge_mean_ms": statistics.fmean(merge) * 1000,
        "bytes_mean": statistics.fmean(size),
        "merge_p99_ms": float(np.percentile(merge, 99)) * 1000,
        "evaluate_ms": statistics.median(judge) * 1000,
        "bytes": statistics.median(size),
        "export_ms": exported * 1000 / count,
        "first_ms": first.cpu_seconds * 1000,
        "first_bytes": first.size,
    }


def _breach_to_rollback(trials: int) -> list[float]:
    from testkit.etcd import EtcdServer

    with tempfile.TemporaryDirectory(prefix="bench-breach-") as scratch:
        etcd = EtcdServer(Path(scratch) / "etcd").start()
        store = f"etcd://{etcd.endpoint}/breach"
        servers = [start_gateway(f"p{i}", ["--store", store]) for i in range(3)]
        try:
            return _trials(servers, trials)
        finally:
            for server in servers:
                server.stop()
            etcd.kill()


class _Load:
    """Closed-loop predictions on every process (two callers each) in background threads."""

    def __init__(self, predicts: list) -> None:  # type: ignore[type-arg]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True) for p in predicts for _ in range(2)]

    def _run(self, predict) -> None:  # type: ignore[no-untyped-def]
        n = 0
        while not self._stop.is_set():
            n += 1
            with contextlib.suppress(grpc.RpcError):  # the injected fault
                predict(request(f"k{n}"), timeout=10)

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def _until_every_process_serves_after(predicts: list, revision: int) -> float:  # type: ignore[type-arg]
    """Seconds until a Predict on every process carries a revision newer than `revision`."""
    began = time.perf_counter()
    seen: set[int] = set()
    probe = request("probe")
    while len(seen) < len(predicts):
        if time.perf_counter() - began > 60:
            raise RuntimeError("no fleet-wide rollback within 60 s")
        for i, predict in enumerate(predicts):
            with contextlib.suppress(grpc.RpcError):
                if i not in seen and predict(probe, timeout=10).route_revision > revision:
                    seen.add(i)  # the only change after the fault: the guardian's rollback
        time.sleep(0.005)
    return time.perf_counter() - began


def _trials(servers: list, trials: int) -> list[float]:  # type: ignore[type-arg]
    admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(admin_target(servers[0])))
    predicts = [gw_grpc.InferenceStub(grpc.insecure_channel(s.target)).Predict for s in servers]

    def call(method: str, message: object) -> admin_pb.ChangeResponse:
        response: admin_pb.ChangeResponse = getattr(admin, method)(message, metadata=ADMIN_METADATA, timeout=30)
        return response

    seconds = []
    with _Load(predicts):
        call("SetGuardrails", admin_pb.SetGuardrailsRequest(
            endpoint="ctr-ranker", rules=["error_rate > 20% for 5s min 20"], reason="bench"))  # fmt: skip
        for _ in range(trials):
            call("SetFault", admin_pb.SetFaultRequest(endpoint="ctr-ranker", version="1.13", clear=True, reason="b"))
            time.sleep(7)  # the 5 s window forgets the last trial's errors before the canary takes traffic again
            call("SetTraffic", admin_pb.SetTrafficRequest(
                endpoint="ctr-ranker", weights={"1.12": 50, "1.13": 50}, reason="bench"))  # fmt: skip
            time.sleep(2)
            fault = call("SetFault", admin_pb.SetFaultRequest(
                endpoint="ctr-ranker", version="1.13", error_rate=1.0, reason="bench"))  # fmt: skip
            seconds.append(_until_every_process_serves_after(predicts, fault.revision))
    return seconds


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    lines = [
        f"Leader per tick: simulated processes of {RATE} requests/s each (45 stable, 5 canary, {FEATURES} "
        f"features), {TICKS} ticks of one second after {HORIZON // 60} minutes of history; medians; the wire "
        "format serialised and parsed as gRPC carries it; the demo's four rules evaluated on the merged windows\n",
        "| processes | leader: parse + merge ms/tick | p99 | leader: evaluate ms/tick | bytes pulled/tick | "
        "member: export ms/tick | new leader's first tick: ms | its bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for count in (1, 3, 10):
        m = results[count] = _leader(count)
        lines.append(
            f"| {count} | {m['merge_ms']:.2f} | {m['merge_p99_ms']:.2f} | {m['evaluate_ms']:.2f} | "
            f"{m['bytes']:.0f} | {m['export_ms']:.2f} | {m['first_ms']:.0f} | {m['first_bytes']:.0f} |"
        )
    ratio = results[10]["merge_ms"] / results[1]["merge_ms"]
    lines.append(f"| **10 / 1** | **{ratio:.1f}x** | | | **{results[10]['bytes'] / results[1]['bytes']:.1f}x** | | | |")
    lines += [
        "",
        "The same with drift rules on (`feature_drift[any]`, `score_drift`): every process also counts "
        f"histograms ({FEATURES} features x 11 bins + scores) on the fleet's bins; the leader merges their finished "
        "10 s slots and evaluates the two rules besides the four. Means over the ticks (a slot crosses once "
        "in ten ticks, so medians would hide it), beside the means of the run above ('without'):\n",
        "| processes | leader: parse + merge ms/tick | without | p99 | leader: evaluate ms/tick | "
        "bytes pulled/tick | without | member: export ms/tick | new leader's first tick: ms | its bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count in (1, 3, 10):
        m, without = _leader(count, drift=True), results[count]
        lines.append(
            f"| {count} | {m['merge_mean_ms']:.2f} | {without['merge_mean_ms']:.2f} | {m['merge_p99_ms']:.2f} | "
            f"{m['evaluate_ms']:.2f} | {m['bytes_mean']:.0f} | {without['bytes_mean']:.0f} | {m['export_ms']:.2f} | "
            f"{m['first_ms']:.0f} | {m['first_bytes']:.0f} |"
        )
    trials = max(3, rounds * 2)
    times = sorted(_breach_to_rollback(trials))
    lines += [
        "",
        "Breach -> fleet-wide rollback: 3 processes on etcd, guardian tick 1 s, rule "
        f"`error_rate > 20% for 5s min 20`, {trials} trials; seconds from SetFault's return until every "
        "process serves the rollback\n",
        "| p50 s | max s | each |",
        "|---:|---:|---|",
        f"| {statistics.median(times):.2f} | {times[-1]:.2f} | {', '.join(f'{t:.2f}' for t in times)} |",
    ]
    return "\n".join(lines)
