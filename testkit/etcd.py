"""A real etcd for tests and benchmarks: started on 127.0.0.1 with free ports and a temporary data dir.

`.ci/run` installs Debian's `etcd-server` when it is missing; without it the etcd tests skip
and say so.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.state.etcd_client import encode

ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)


def require_etcd() -> str:
    """The etcd binary, or skip the test that needs it (saying how to install it)."""
    if ETCD is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server; .ci/run does this)")
    return ETCD


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One etcd member; `kill()` and `start()` again keep its ports and data (a restart)."""

    def __init__(self, data_dir: Path, *extra: str, tls_client: tuple[Path, Path, Path] | None = None) -> None:
        self.binary = require_etcd()
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.extra = extra
        #: (CA, client certificate, key) to check readiness over TLS.
        self.tls_client = tls_client
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"etcd-{self.client_port}.log"

    @property
    def endpoint(self) -> str:
        """HOST:PORT of its client listener."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def scheme(self) -> str:
        """Https when started with a server certificate, else http."""
        return "https" if "--cert-file" in " ".join(self.extra) else "http"

    def url(self, prefix: str = "") -> str:
        """A store URL under a prefix of its own (each test owns its keys)."""
        return f"etcd://{self.endpoint}/{prefix or 'test-' + uuid.uuid4().hex[:12]}"

    def start(self) -> EtcdServer:
        """Start (or restart) the member and wait until it answers /health."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"{self.scheme}://{self.endpoint}"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary, "--name", "test", "--data-dir", str(self.data_dir),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"test={peer}", "--log-level", "error", *self.extra,
                ],
                stdout=log,
                stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5):
                    if self._ready():
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not start: {self.log.read_text()[-2000:]}")

    def _ready(self) -> bool:
        verify: ssl.SSLContext | bool = False
        if self.tls_client is not None:
            ca, cert, key = self.tls_client
            verify = ssl.create_default_context(cafile=str(ca))
            verify.load_cert_chain(str(cert), str(key))
        try:
            return httpx.get(f"{self.scheme}://{self.endpoint}/health", timeout=1, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash; `start()` brings it back with its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to etcd's JSON gateway (v3 API) and return its answer."""
        response = httpx.post(f"http://{self.endpoint}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def compact(self) -> int:
        """Compact etcd's history up to its current revision; returns that revision."""
        revision = int(self.call("/v3/kv/range", {"key": encode("/")})["header"]["revision"])
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision
