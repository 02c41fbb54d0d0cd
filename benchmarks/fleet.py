"""Issue 14's benchmarks: propagation across processes, and `--workers 2` vs `--workers 1`.

- **Propagation**: 3 gateway processes on one store (one SQLite file; one etcd); 100 changes,
  each through the next process's admin port in turn; after each admin call returns, every
  process is polled with Predict until a response carries the new route revision. Reported:
  p50/p99/max over the 300 (change, process) pairs, and p50/p99 of the slowest of the three.
- **Workers**: `gateway serve --workers 2` vs `--workers 1`, closed loop at concurrency 32
  spread over 32 connections (SO_REUSEPORT balances connections, not requests), alternating
  rounds; requests/s, latency, and the CPU of the gateway (all its processes) and of the load
  generator, which shares the cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import (
    ADMIN_METADATA,
    Server,
    admin_target,
    alternate,
    cpu_seconds,
    errors_checked,
    start_gateway,
)
from benchmarks.loadgen import request
from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.gateways import ROOT

CHANGES = 100
PROCESSES = 3


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a `--workers` supervisor and its workers)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        with contextlib.suppress(FileNotFoundError):  # a worker that just exited
            total += cpu_seconds(int(child))
    return total


def _propagation(store: str) -> dict[str, float]:
    servers = [start_gateway(f"p{i}", ["--store", store]) for i in range(PROCESSES)]
    try:
        channels = [grpc.insecure_channel(s.target) for s in servers]
        admins = [admin_pb2_grpc.AdminStub(grpc.insecure_channel(admin_target(s))) for s in servers]
        predicts = [gw_grpc.InferenceStub(c).Predict for c in channels]
        probe = request("probe")
        for predict in predicts:
            predict(probe, timeout=10)
        each: list[float] = []
        slowest: list[float] = []
        for change in range(CHANGES):
            canary = 11 + change % 50
            weights = {"1.12": 100 - canary, "1.13": canary}
            response = admins[change % PROCESSES].SetTraffic(
                admin_pb.SetTrafficRequest(endpoint="ctr-ranker", weights=weights, reason="propagation benchmark"),
                metadata=ADMIN_METADATA,
                timeout=30,
            )
            returned = time.perf_counter()
            seen: dict[int, float] = {}
            while len(seen) < PROCESSES:
                if time.perf_counter() - returned > 30:
                    raise RuntimeError(f"revision {response.revision} did not reach every process in 30 s")
                for i, predict in enumerate(predicts):
                    if i not in seen and predict(probe, timeout=10).route_revision >= response.revision:
                        seen[i] = time.perf_counter() - returned
            each.extend(seen.values())
            slowest.append(max(seen.values()))
        ms = np.asarray(each) * 1000
        worst = np.asarray(slowest) * 1000
        return {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()),
            "all_p50": float(np.percentile(worst, 50)),
            "all_p99": float(np.percentile(worst, 99)),
        }
    finally:
        for server in servers:
            server.stop()


def _load(server: Server, concurrency: int, seconds: float) -> dict[str, float]:
    args = [
        sys.executable, "-m", "benchmarks.loadgen", server.target, str(concurrency), str(seconds),
        "--channels", str(concurrency),
    ]  # fmt: skip
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert client.stdout is not None
    if client.stdout.readline().strip() != "measuring":
        raise RuntimeError(f"load generator against {server.name} failed (code {client.wait(30)})")
    before = (_tree_cpu(server.process.pid), cpu_seconds(client.pid))
    line = client.stdout.readline()
    after = (_tree_cpu(server.process.pid), cpu_seconds(client.pid))
    if client.wait(timeout=30) != 0 or not line:
        raise RuntimeError(f"load generator against {server.name} failed (code {client.returncode})")
    result: dict[str, float] = json.loads(line)
    result["gateway_cores"] = (after[0] - before[0]) / result["seconds"]
    result["client_cores"] = (after[1] - before[1]) / result["seconds"]
    return result


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    from testkit.etcd import EtcdServer

    lines = [
        f"Propagation: {PROCESSES} processes, {CHANGES} changes, each through the next process's admin port; "
        "ms from the admin call's return until a Predict on a process carries the new revision\n",
        "| store | p50 ms (each) | p99 ms (each) | max ms | p50 ms (all 3) | p99 ms (all 3) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as scratch:
        etcd = EtcdServer(Path(scratch) / "etcd").start()
        try:
            for name, store in (
                ("SQLite, one file", f"sqlite:///{scratch}/shared.db"),
                ("etcd", f"etcd://{etcd.endpoint}/bench"),
            ):
                m = _propagation(store)
                lines.append(
                    f"| {name} | {m['p50']:.1f} | {m['p99']:.1f} | {m['max']:.1f} | "
                    f"{m['all_p50']:.1f} | {m['all_p99']:.1f} |"
                )
        finally:
            etcd.kill()
    concurrency = 32
    servers = [start_gateway("workers 1"), start_gateway("workers 2", ["--workers", "2"])]
    try:
        one, two = alternate(servers, rounds, lambda s: _load(s, concurrency, seconds))
    finally:
        for server in servers:
            server.stop()
    errors = sum(r["errors"] for r in one + two)
    lines += [
        "",
        f"Workers: concurrency {concurrency} over {concurrency} connections, batch 1, {rounds} alternating rounds "
        f"of {seconds:g} s; medians; CPU in cores busy (of {os.cpu_count()})\n",
        "| server | requests/s | p50 ms | p99 ms | gateway CPU (cores) | load generator CPU (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in (("--workers 1", one), ("--workers 2", two)):
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(
            f"| {name} | {med['rps']:.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
            f"{med['gateway_cores']:.2f} | {med['client_cores']:.2f} | {sum(r['errors'] for r in runs):.0f} |"
        )
    ratio = statistics.median(b["rps"] / a["rps"] for a, b in zip(one, two, strict=True))
    lines.append(f"| **workers 2 / workers 1** | **{ratio:.2f}x** | | | | | |")
    return errors_checked("fleet", "\n".join(lines), errors)
