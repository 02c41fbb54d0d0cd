"""Shared benchmark plumbing: start servers as processes, read their CPU time, drive load, alternate rounds."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from testkit.gateways import MODELS, ROOT

#: The stable version's model file: what the bare server and the batch baseline run.
STABLE_MODEL = MODELS / "ctr-ranker" / "1.12" / "model.onnx"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
R = TypeVar("R")

#: The admin token every benchmark gateway accepts, and the metadata that presents it.
ADMIN_TOKEN = "bench-admin-token-0123456789"
ADMIN_ENV = {"GATEWAY_ADMIN_TOKENS": f"bench={ADMIN_TOKEN}"}
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (VmHWM: reset at exec, unlike getrusage's ru_maxrss,
    which on Linux keeps the high-water mark of the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    target: str
    ready_line: str = ""
    scratch: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        if self.scratch is not None:
            self.scratch.cleanup()


def start(
    name: str,
    command: list[str],
    ready: str,
    env: dict[str, str] | None = None,
    scratch: tempfile.TemporaryDirectory[str] | None = None,
) -> Server:
    """Start a server process and wait for its ready line; `ready` is a regex with the port as group 1."""
    with tempfile.TemporaryFile("w+") as errors:  # the server's stderr, to say why a start failed
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        assert process.stdout is not None
        for line in process.stdout:
            match = re.search(ready, line)
            if match:
                return Server(name, process, f"127.0.0.1:{match.group(1)}", line, scratch)
        code = process.wait()
        if scratch is not None:
            scratch.cleanup()
        errors.seek(0)
        raise RuntimeError(f"{name} exited before it was ready (code {code}): {errors.read()[-2000:]}")


def start_gateway(name: str = "gateway", extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Server:
    """`gateway serve` on free ports with its own scratch directory (store, shadow log; removed at stop).

    `extra` is appended to those defaults; the bench admin token is always accepted.
    """
    scratch = tempfile.TemporaryDirectory(prefix="bench-gateway-")
    command = [
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "serve",
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--store", f"sqlite:///{scratch.name}/state.db", "--shadow-log-dir", f"{scratch.name}/shadow",
        *extra,
    ]  # fmt: skip
    try:
        return start(name, command, r"inference on 127\.0\.0\.1:(\d+)", {**ADMIN_ENV, **(env or {})}, scratch)
    except BaseException:
        scratch.cleanup()
        raise


def start_bare(name: str = "bare", model: Path = STABLE_MODEL, threads: int = 0) -> Server:
    """A bare server on `model`: grpc.aio with the run inline, or a thread-pool server with `threads`."""
    command = [sys.executable, "-m", "benchmarks.bare_server", str(model)]
    return start(name, [*command, "--threads", str(threads)] if threads else command, r"ready (\d+)")


def admin_target(server: Server) -> str:
    """HOST:PORT of a gateway's admin listener, from its ready line."""
    match = re.search(r"admin on ([^\s,]+)", server.ready_line)
    if match is None:
        raise RuntimeError(f"{server.name}: no admin address in {server.ready_line!r}")
    return match.group(1)


def load(
    server: Server,
    concurrency: int,
    seconds: float,
    *,
    sink: Server | None = None,
    model: str = "",
    rows: int = 1,
) -> dict[str, float]:
    """Drive one closed-loop run; adds the server's CPU seconds per request and its CPU use in percent
    of one core (measured window only), and the sink's (`sink_cpu_us_per_req`) when one is given.
    `model` and `rows` choose the endpoint called (default ctr-ranker) and the rows per request."""
    args = [sys.executable, "-m", "benchmarks.loadgen", server.target, str(concurrency), str(seconds)]
    args += [*(["--model", model] if model else []), "--rows", str(rows)]
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert client.stdout is not None
    if client.stdout.readline().strip() != "measuring":
        raise RuntimeError(f"load generator against {server.name} failed (code {client.wait(30)})")
    watched = [server] if sink is None else [server, sink]
    before = [cpu_seconds(s.process.pid) for s in watched]
    line = client.stdout.readline()
    after = [cpu_seconds(s.process.pid) for s in watched]
    if client.wait(timeout=30) != 0 or not line:
        raise RuntimeError(f"load generator against {server.name} failed (code {client.returncode})")
    result: dict[str, float] = json.loads(line)
    per_request = [(a - b) / max(result["requests"], 1) * 1e6 for a, b in zip(after, before, strict=True)]
    result["cpu_us_per_req"] = per_request[0]
    result["cpu_percent"] = (after[0] - before[0]) / max(result["seconds"], 1e-9) * 100
    if sink is not None:
        result["sink_cpu_us_per_req"] = per_request[1]
    return result


def alternate(items: Sequence[T], rounds: int, measure: Callable[[T], R]) -> list[list[R]]:
    """`measure` each item once per round: in order on even rounds, reversed on odd ones, so that no
    configuration always runs first (or always right after another). Returns results[item][round]."""
    results: list[list[R]] = [[] for _ in items]
    for round_index in range(rounds):
        order = range(len(items)) if round_index % 2 == 0 else reversed(range(len(items)))
        for i in order:
            results[i].append(measure(items[i]))
    return results


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """One configuration over its rounds: the median of each figure, but errors and requests summed."""
    summed = {"errors", "requests"}
    return {k: (sum if k in summed else statistics.median)(r[k] for r in runs) for k in runs[0]}


def paired_ratio(runs: list[dict[str, float]], baseline: list[dict[str, float]], key: str) -> float:
    """Median over rounds of run / baseline, each round's pair measured side by side."""
    return statistics.median(r[key] / b[key] for r, b in zip(runs, baseline, strict=True))


def paired_delta(runs: list[dict[str, float]], baseline: list[dict[str, float]], key: str) -> float:
    """Median over rounds of run - baseline, each round's pair measured side by side."""
    return statistics.median(r[key] - b[key] for r, b in zip(runs, baseline, strict=True))


def errors_checked(suite: str, text: str, errors: float) -> str:
    """Return the suite's text, or fail loudly (the text in the message) when requests failed that should not."""
    if errors:
        raise RuntimeError(f"{suite}: {errors:.0f} request(s) failed where none should; figures below are void\n{text}")
    return text
