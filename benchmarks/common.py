"""Shared benchmark plumbing: start servers as processes, read their CPU time, drive load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    target: str
    ready_line: str = ""

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start(name: str, command: list[str], ready: str, env: dict[str, str] | None = None) -> Server:
    """Start a server process and wait for its ready line; `ready` is a regex with the port as group 1."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(ready, line)
        if match:
            return Server(name, process, f"127.0.0.1:{match.group(1)}", line)
    raise RuntimeError(f"{name} exited before it was ready (code {process.wait()})")


def start_gateway(name: str = "gateway", extra: list[str] | None = None, env: dict[str, str] | None = None) -> Server:
    return start(
        name,
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            "127.0.0.1:0",
            *(extra or ["--admin-listen", "127.0.0.1:0", "--store", f"sqlite:///{tempfile.mkdtemp()}/state.db"]),
        ],
        r"inference on 127\.0\.0\.1:(\d+)",
        env,
    )


def start_bare() -> Server:
    model = ROOT / "models" / "ctr-ranker" / "1.12" / "model.onnx"
    return start("bare", [sys.executable, "-m", "benchmarks.bare_server", str(model)], r"ready (\d+)")


def load(server: Server, concurrency: int, seconds: float, *, keys: bool = True) -> dict[str, float]:
    """Drive one closed-loop run; adds the server's CPU seconds per request (measured window only)."""
    args = [sys.executable, "-m", "benchmarks.loadgen", server.target, str(concurrency), str(seconds)]
    if keys:
        args.append("--keys")
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "measuring"
    cpu_before = cpu_seconds(server.process.pid)
    line = client.stdout.readline()
    cpu_after = cpu_seconds(server.process.pid)
    client.wait(timeout=30)
    result: dict[str, float] = json.loads(line)
    result["cpu_us_per_req"] = (cpu_after - cpu_before) / max(result["requests"], 1) * 1e6
    return result
