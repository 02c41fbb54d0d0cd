"""`gateway serve --workers N`: N gateway processes on one host, one command.

The supervisor (this process) serves nothing itself. It starts N workers, each a plain
`gateway serve` with the same flags, and:

- **one inference address**: every worker binds it with SO_REUSEPORT, and the kernel spreads
  new connections over them (port 0 is resolved once, here, so all bind the same port);
- **one admin address**, shared the same way: an admin call lands on any one worker. A change
  commits to the shared store and every worker follows the store (`gateway/follower.py`), so
  it reaches all of them; reads of one process's own state (shadow statistics, guardrail
  windows) describe the worker that answered, which `gateway admin routes` names;
- **one Prometheus scrape**: each worker serves its metrics on a private loopback port and the
  supervisor's `--metrics-listen` page merges them, each sample labelled `worker="I"`;
- **one signal**: SIGTERM or SIGINT reaches every worker, each drains its in-flight calls
  (`--grace`), and the supervisor exits when all have; SIGHUP (TLS reload) is passed on.
  A worker that dies on its own is started again; the others keep serving meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from gateway.cli.output import fail
from gateway.errors import InvalidInput
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.workers")

_READY = re.compile(r"gateway ready: inference on \S+, admin on (\S+?),? (?:metrics on 127\.0\.0\.1:(\d+) )?\((.*)\)")
_PR_SET_PDEATHSIG = 1
#: Set in each worker's environment: the supervisor's pid.
SUPERVISOR_ENV = "MODEL_GATEWAY_SUPERVISOR_PID"
#: A worker that keeps dying is not restarted faster than this.
RESTART_SECONDS = 1.0


@dataclass
class Worker:
    """One worker process and what its ready line said."""

    index: int
    command: list[str]
    process: subprocess.Popen[str] | None = None
    metrics: str = ""
    summary: str = ""
    started: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start the process; a thread waits for its ready line, then relays its output."""
        self.started.clear()
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read, args=(self.process,), name=f"worker-{self.index}", daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self.summary = ""
        for line in process.stdout:
            match = _READY.search(line)
            if match and not self.started.is_set():
                self.metrics = f"127.0.0.1:{match.group(2)}" if match.group(2) else ""
                self.summary = match.group(3)
                self.started.set()
            else:
                print(f"[worker {self.index}] {line}", end="", flush=True)
        self.started.set()  # exited before it was ready: the supervisor sees the exit code


def follow_supervisor() -> None:
    """In a worker: get SIGTERM (and so drain) when the supervisor dies, even by SIGKILL, so none outlives it.

    Linux's PR_SET_PDEATHSIG, set by the worker itself rather than between fork and exec
    (the supervisor has threads).
    """
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(supervisor):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _reserve(listen: str) -> tuple[str, socket.socket | None]:
    """`listen` with port 0 replaced by a free port, held (bound, not listening) until the workers bind it."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise InvalidInput(f"cannot listen on {listen!r}: use HOST:PORT")
    if int(port):
        return listen, None
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host.strip("[]"), 0))
    return f"{host}:{holder.getsockname()[1]}", holder


class Supervisor:
    """Owns the worker processes, the shared addresses and the merged metrics page."""

    def __init__(self, args: argparse.Namespace, settings: GatewaySettings) -> None:
        self.argv: list[str] = args.argv
        self.settings = settings
        self.workers: list[Worker] = []
        self._stopping = threading.Event()
        self._metrics_server: object | None = None

    def run(self) -> int:
        """Start the workers, print one ready line, supervise until SIGTERM/SIGINT, drain all."""
        listen, inference_holder = _reserve(self.settings.listen)
        admin_listen, admin_holder = _reserve(self.settings.admin_listen)
        # Flags win over the environment and the route file, so workers do not start workers of their own.
        overrides = ["--workers", "1", "--reuse-port", "true", "--listen", listen, "--admin-listen", admin_listen]
        # Each worker is pulled from on its own: a port of its own on the fleet listener's host.
        overrides += ["--fleet-listen", f"{self.settings.fleet_listen.rsplit(':', 1)[0]}:0"]
        if self.settings.metrics_listen:
            overrides += ["--metrics-listen", "127.0.0.1:0"]
        base = [sys.executable, "-m", "gateway.cli", *self.argv, *overrides]
        self.workers = [Worker(i, base) for i in range(self.settings.workers)]
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._forward(signal.SIGHUP))  # TLS reload reaches every worker
        try:
            for worker in self.workers:
                worker.start()
            for worker in self.workers:
                worker.started.wait()
                assert worker.process is not None
                if not worker.summary:  # its output ended before a ready line: it exited
                    code = worker.process.wait()
                    self._stop_all()
                    return fail(f"worker {worker.index} exited with {code} while starting", 2)
            metrics = self._serve_metrics()
        finally:
            for holder in (inference_holder, admin_holder):
                if holder is not None:
                    holder.close()
        print(
            f"gateway ready: inference on {listen}, admin on {admin_listen}{metrics} "
            f"({len(self.workers)} workers; {self.workers[0].summary})",
            flush=True,
        )
        self._supervise()
        return self._stop_all()

    def _forward(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(sig)

    def _serve_metrics(self) -> str:
        if not self.settings.metrics_listen:
            return ""
        from prometheus_client import CollectorRegistry, start_http_server

        from gateway.telemetry.worker_scrape import WorkerScrapes

        host, _, port = self.settings.metrics_listen.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkerScrapes(lambda: {str(w.index): w.metrics for w in self.workers if w.metrics}))
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
        self._metrics_server = server
        return f", metrics on {host}:{server.server_port}"

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for worker in self.workers:
                assert worker.process is not None
                if worker.process.poll() is not None and not self._stopping.is_set():
                    log.error("worker %d exited with %s; starting it again", worker.index, worker.process.returncode)
                    self._stopping.wait(RESTART_SECONDS)
                    if not self._stopping.is_set():
                        worker.start()

    def _stop_all(self) -> int:
        """SIGTERM every worker and wait for each to drain; 0 when all exited cleanly."""
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace + 15
        code = 0
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.wait()
            code = code or (worker.process.returncode != 0)
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                self._metrics_server.shutdown()  # type: ignore[attr-defined]
        return int(code)


def supervise(args: argparse.Namespace, settings: GatewaySettings) -> int:
    """Run `settings.workers` gateway processes behind shared addresses until SIGTERM/SIGINT."""
    try:
        return Supervisor(args, settings).run()
    except InvalidInput as err:
        return fail(err.message, 2)
