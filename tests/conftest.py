from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.etcd import EtcdServer
from testkit.gateways import RunningGateway, running_gateway


@pytest.fixture(scope="module")
def demo() -> Iterator[RunningGateway]:
    """The demo gateway (90% 1.12 stable, 10% 1.13 canary, 1.14 loaded) on a free port."""
    with running_gateway() as running:
        yield running


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the session; tests keep apart by prefix (`etcd.url()`)."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data").start()
    yield server
    server.kill()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd this test may kill and restart."""
    server = EtcdServer(tmp_path / "etcd-data").start()
    yield server
    server.kill()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many generated requests the property tests sent (they run bounded, so say how many)."""
    import sys

    properties = sys.modules.get("tests.test_properties")
    if properties is not None and properties.COUNTS:
        ran = sum(properties.COUNTS.values())
        terminalreporter.write_line(
            f"property tests: {ran} generated requests over {len(properties.COUNTS)} RPCs, none INTERNAL or UNKNOWN"
        )
