"""Issue 3's benchmark: how fast a rollback takes effect under load, and what switching costs.

One gateway process, a recorder client at concurrency 8 that logs every request (start, end,
served version), and an admin driver in this process that alternates SetTraffic (50% to the
canary) and Rollback, 200 changes in all. Measured: time from a Rollback call's return to
the first request served by the rollback target that started after it; requests that
started after a rollback returned but were served by another version before the next change
(must be 0); and throughput with the 200 switches under way vs none, in one run (alternating, the order
reversed on odd rounds; every run starts with all traffic on stable).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import ADMIN_METADATA, admin_target, alternate, errors_checked, paired_ratio, start_gateway
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc
from testkit.gateways import DEMO_CONFIG, ROOT

CHANGES = 200
CONCURRENCY = 8
QUIET, BUSY = "no changes", "changes"


def _record(target: str, seconds: float, out: Path) -> subprocess.Popen[str]:
    client = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.recorder", target, str(CONCURRENCY), str(seconds), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert client.stdout is not None
    if client.stdout.readline().strip() != "measuring":
        raise RuntimeError(f"recorder failed (code {client.wait(30)})")
    return client


def _finish(client: subprocess.Popen[str]) -> dict[str, float]:
    assert client.stdout is not None
    line = client.stdout.readline()
    if client.wait(30) != 0 or not line:
        raise RuntimeError(f"recorder failed (code {client.returncode})")
    result: dict[str, float] = json.loads(line)
    return result


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    del concurrencies  # this suite runs at one concurrency
    duration = max(seconds * 2, 8.0)
    delays: list[float] = []
    change_ms: list[float] = []
    strays = 0
    with tempfile.TemporaryDirectory() as scratch:
        server = start_gateway("gateway")
        admin = ""

        def measure(condition: str) -> dict[str, float]:
            nonlocal strays
            out = Path(scratch) / "records.npy"
            client = _record(server.target, duration, out)
            if condition == QUIET:
                return _finish(client)
            rollbacks, calls = _switch(admin, duration)
            result = _finish(client)
            change_ms.extend(calls)
            d, s = _effect(np.load(out), rollbacks)
            delays.extend(d)
            strays += s
            return result

        try:
            admin = admin_target(server)
            _start_at_stable(admin)
            quiet, busy = alternate([QUIET, BUSY], rounds, measure)
        finally:
            server.stop()
    delays_ms = np.asarray(delays) * 1000
    errors = sum(r["errors"] for r in quiet), sum(r["errors"] for r in busy)
    swap_quiet, swap_busy, swap_ratio = _swap_only(duration / 2, CHANGES // 2)
    text = (
        f"{CHANGES} changes per round (SetTraffic 50% canary / Rollback, alternating) over {duration:.0f} s "
        f"({CHANGES / duration:.0f}/s), closed-loop load at concurrency {CONCURRENCY}, {rounds} round(s), "
        "runs with and without changes alternating (the order reversed on odd rounds)\n\n"
        "| measure | value |\n|---|---:|\n"
        "| rollback return -> first request served by the target, p50 | "
        f"{np.percentile(delays_ms, 50):.2f} ms |\n"
        f"| same, p99 / max | {np.percentile(delays_ms, 99):.2f} / {delays_ms.max():.2f} ms |\n"
        f"| rollbacks measured | {len(delays)} |\n"
        f"| requests started after a rollback returned, served by another version | {strays} |\n"
        f"| admin change round trip (commit + swap), p50 / p99 / max | {np.percentile(change_ms, 50):.1f} / "
        f"{np.percentile(change_ms, 99):.1f} / {max(change_ms):.1f} ms |\n"
        f"| failed requests, no changes / changes under way (all rounds) | {errors[0]} / {errors[1]} |\n"
        f"| requests/s, no changes (median) | {statistics.median(r['rps'] for r in quiet):.0f} |\n"
        f"| requests/s, {CHANGES} changes under way (median) | {statistics.median(r['rps'] for r in busy):.0f} |\n"
        f"| **with changes / without** (median of per-round ratios) | **{paired_ratio(busy, quiet, 'rps'):.2f}x** |\n"
        f"| in-process infer() calls/s, table never swapped | {swap_quiet:.0f} |\n"
        f"| in-process infer() calls/s, table swapped at {CHANGES / duration:.0f}/s (the rate above) | "
        f"{swap_busy:.0f} |\n"
        f"| **data plane alone: swapped / not** (median of per-round ratios) | **{swap_ratio:.2f}x** |"
    )
    return errors_checked("control", text, sum(errors))


def _swap_only(seconds: float, swaps: int) -> tuple[float, float, float]:
    """In-process: InferenceService.infer calls/s with the route table swapped `swaps` times vs never.

    Isolates the data plane's side of a switch (one attribute read per request) from the
    control plane's CPU (commit, diff, gRPC) that competes for the same two cores above.
    Returns the medians of both over 3 alternating rounds and the median per-round ratio.
    """
    import threading

    from gateway.app import Gateway
    from gateway.desired import load_route_file
    from gateway.inference import InferRequest
    from gateway.state.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as scratch:
        gateway = Gateway(load_route_file(DEMO_CONFIG), SqliteStore(Path(scratch) / "s.db"))
        gateway.start()
        state = gateway.control.state
        tables = [
            state.update("ctr-ranker", lambda ep: ep.with_(weights={"1.12": 50, "1.13": 50})).route_table(2),
            state.route_table(3),
        ]
        x = np.zeros((1, 32), dtype=np.float32)
        request = InferRequest("ctr-ranker", {"features": x}, routing_key="user-1")

        def rate(swapping: bool) -> dict[str, float]:
            stop = threading.Event()

            def swapper() -> None:
                for i in range(swaps):
                    if stop.wait(seconds / swaps):
                        return
                    gateway.router.swap(tables[i % 2])

            thread = threading.Thread(target=swapper)
            if swapping:
                thread.start()
            count, end = 0, time.perf_counter() + seconds
            while time.perf_counter() < end:
                gateway.inference.infer(request)
                count += 1
            stop.set()
            if swapping:
                thread.join()
            return {"rate": count / seconds}

        quiet, busy = alternate([False, True], 3, rate)
        gateway.close()
    median = statistics.median
    return median(r["rate"] for r in quiet), median(r["rate"] for r in busy), paired_ratio(busy, quiet, "rate")


def _start_at_stable(admin: str) -> None:
    """Roll the seeded 90/10 split back once, so every run starts from all traffic on stable (as each
    run with changes ends: its last change is a Rollback)."""
    with grpc.insecure_channel(admin) as channel:
        pb_grpc.AdminStub(channel).Rollback(
            pb.RollbackRequest(endpoint="ctr-ranker", reason="bench: start at stable"), metadata=ADMIN_METADATA
        )


def _switch(admin: str, duration: float) -> tuple[list[tuple[float, float]], list[float]]:
    """Alternate SetTraffic and Rollback; returns (rollback returned, next change issued) pairs."""
    gap = duration / CHANGES
    windows, calls, returned = [], [], None
    with grpc.insecure_channel(admin) as channel:
        stub = pb_grpc.AdminStub(channel)
        for i in range(CHANGES):
            issued = time.monotonic()
            if returned is not None:
                windows.append((returned, issued))
                returned = None
            if i % 2 == 0:
                stub.SetTraffic(
                    pb.SetTrafficRequest(endpoint="ctr-ranker", weights={"1.12": 50, "1.13": 50}, reason="bench"),
                    metadata=ADMIN_METADATA,
                )
            else:
                stub.Rollback(pb.RollbackRequest(endpoint="ctr-ranker", reason="bench"), metadata=ADMIN_METADATA)
                returned = time.monotonic()
            calls.append((time.monotonic() - issued) * 1000)
            time.sleep(max(0.0, gap - (time.monotonic() - issued)))
    return windows, calls


def _effect(records: np.ndarray, windows: list[tuple[float, float]]) -> tuple[list[float], int]:
    """Per rollback: delay to the first target-served completion; count of wrong-version requests."""
    delays, strays = [], 0
    for returned, next_issued in windows:
        after = records[(records[:, 0] >= returned) & (records[:, 1] < next_issued)]
        strays += int(np.count_nonzero(after[:, 2] != 0))
        served = after[after[:, 2] == 0]
        if len(served):
            delays.append(float(served[:, 1].min() - returned))
    return delays, strays
