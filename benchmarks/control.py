"""Issue 3's benchmark: how fast a rollback takes effect under load, and what switching costs.

One gateway process, a recorder client at concurrency 8 that logs every request (start, end,
served version), and an admin driver in this process that alternates SetTraffic (50% to the
canary) and Rollback, 200 changes in all. Measured: time from a Rollback call's return to
the first request served by the rollback target that started after it; requests that
started after a rollback returned but were served by another version before the next change
(must be 0); and throughput with the 200 switches under way vs none, in one run.
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

from benchmarks.common import ROOT, start_gateway
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc as pb_grpc

TOKEN = "bench-admin-token-0123456789"
CHANGES = 200
CONCURRENCY = 8


def _record(target: str, seconds: float, out: Path) -> subprocess.Popen[str]:
    client = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.recorder", target, str(CONCURRENCY), str(seconds), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "measuring"
    return client


def _finish(client: subprocess.Popen[str]) -> dict[str, float]:
    assert client.stdout is not None
    result: dict[str, float] = json.loads(client.stdout.readline())
    client.wait(30)
    return result


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    del concurrencies  # this suite runs at one concurrency
    duration = max(seconds * 2, 8.0)
    with tempfile.TemporaryDirectory() as scratch:
        store = f"sqlite:///{scratch}/state.db"
        server = start_gateway(
            "gateway",
            ["--admin-listen", "127.0.0.1:0", "--store", store],
            env={"GATEWAY_ADMIN_TOKENS": f"bench={TOKEN}"},
        )
        admin_port = _admin_port(server)
        try:
            quiet_rps, busy_rps, delays, strays, change_ms = [], [], [], 0, []
            for round_index in range(rounds):
                quiet = _finish(_record(server.target, duration, Path(scratch) / "quiet.npy"))
                quiet_rps.append(quiet["rps"])
                out = Path(scratch) / f"busy-{round_index}.npy"
                client = _record(server.target, duration, out)
                rollbacks, calls = _switch(admin_port, duration)
                busy = _finish(client)
                busy_rps.append(busy["rps"])
                change_ms.extend(calls)
                records = np.load(out)
                d, s = _effect(records, rollbacks)
                delays.extend(d)
                strays += s
        finally:
            server.stop()
    delays_ms = np.asarray(delays) * 1000
    swap_quiet, swap_busy = _swap_only(duration / 2)
    return (
        f"{CHANGES} changes per round (SetTraffic 50% canary / Rollback, alternating) over {duration:.0f} s, "
        f"closed-loop load at concurrency {CONCURRENCY}, {rounds} round(s)\n\n"
        "| measure | value |\n|---|---:|\n"
        "| rollback return -> first request served by the target, p50 | "
        f"{np.percentile(delays_ms, 50):.2f} ms |\n"
        f"| same, p99 | {np.percentile(delays_ms, 99):.2f} ms |\n"
        f"| rollbacks measured | {len(delays)} |\n"
        f"| requests started after a rollback returned, served by another version | {strays} |\n"
        f"| admin change round trip (commit + swap), p50 / p99 | {np.percentile(change_ms, 50):.1f} / "
        f"{np.percentile(change_ms, 99):.1f} ms |\n"
        f"| requests/s, no changes (median) | {statistics.median(quiet_rps):.0f} |\n"
        f"| requests/s, {CHANGES} changes under way (median) | {statistics.median(busy_rps):.0f} |\n"
        "| **with changes / without** | "
        f"**{statistics.median(busy_rps) / statistics.median(quiet_rps):.2f}x** |\n"
        f"| in-process infer() calls/s, table never swapped | {swap_quiet:.0f} |\n"
        f"| in-process infer() calls/s, table swapped {CHANGES} times | {swap_busy:.0f} |\n"
        f"| **data plane alone: swapped / not** | **{swap_busy / swap_quiet:.2f}x** |"
    )


def _swap_only(seconds: float) -> tuple[float, float]:
    """In-process: InferenceService.infer calls/s with the route table swapped 200 times vs never.

    Isolates the data plane's side of a switch (one attribute read per request) from the
    control plane's CPU (commit, diff, gRPC) that competes for the same two cores above.
    """
    import threading

    from gateway.app import Gateway
    from gateway.config import load_config
    from gateway.inference import InferRequest
    from gateway.state.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as scratch:
        gateway = Gateway(load_config(ROOT / "models" / "gateway.yaml"), SqliteStore(Path(scratch) / "s.db"))
        gateway.start()
        state = gateway.control.state
        tables = [
            state.update("ctr-ranker", lambda ep: ep.with_(weights={"1.12": 50, "1.13": 50})).route_table(2),
            state.route_table(3),
        ]
        x = np.zeros((1, 32), dtype=np.float32)
        request = InferRequest("ctr-ranker", {"features": x}, routing_key="user-1")

        def rate(swapping: bool) -> float:
            stop = threading.Event()

            def swapper() -> None:
                for i in range(CHANGES):
                    if stop.wait(seconds / CHANGES):
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
            return count / seconds

        quiet, busy = [], []
        for _ in range(3):
            quiet.append(rate(False))
            busy.append(rate(True))
        gateway.close()
    return statistics.median(quiet), statistics.median(busy)


def _admin_port(server: object) -> str:
    line = getattr(server, "ready_line", "")
    return line.split("admin on ")[1].split()[0]


def _switch(admin: str, duration: float) -> tuple[list[tuple[float, float]], list[float]]:
    """Alternate SetTraffic and Rollback; returns (rollback returned, next change issued) pairs."""
    gap = duration / CHANGES
    windows, calls, returned = [], [], None
    metadata = (("authorization", f"Bearer {TOKEN}"),)
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
                    metadata=metadata,
                )
            else:
                stub.Rollback(pb.RollbackRequest(endpoint="ctr-ranker", reason="bench"), metadata=metadata)
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
