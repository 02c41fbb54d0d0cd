"""A `gateway serve` start that fails part way stops everything it had started."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from gateway.cli.serve import _serve
from gateway.errors import InvalidInput
from gateway.settings import GatewaySettings
from testkit.etcd import free_port
from testkit.fleet import wait_until
from testkit.gateways import DEMO_CONFIG


def test_a_start_that_fails_at_the_admin_listener_leaves_nothing_running(tmp_path: Path) -> None:
    inference_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = GatewaySettings.plain(
            config=DEMO_CONFIG,
            store=f"sqlite:///{tmp_path / 'gateway.db'}",
            listen=f"127.0.0.1:{inference_port}",
            admin_listen=f"127.0.0.1:{taken.getsockname()[1]}",
            shadow={"log_dir": ""},
        )
        before = set(threading.enumerate())
        with pytest.raises(InvalidInput, match="cannot listen on"):
            asyncio.run(_serve(settings))

    def started_threads() -> list[str]:
        # grpc.aio's poller thread is grpc's own, kept for the process's later servers
        ours = [t for t in threading.enumerate() if t not in before and "_poll_wrapper" not in t.name]
        return [t.name for t in ours if t.is_alive()]

    assert wait_until(lambda: not started_threads(), timeout=10), f"threads left running: {started_threads()}"
    with socket.socket() as probe:  # the inference listener, started before the admin one failed, is closed
        probe.bind(("127.0.0.1", inference_port))
