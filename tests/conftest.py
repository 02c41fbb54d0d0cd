from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.etcd_server import etcd, own_etcd  # noqa: F401 - fixtures
from testkit.gateways import RunningGateway, running_gateway


@pytest.fixture(scope="module")
def demo() -> Iterator[RunningGateway]:
    """The demo gateway (90% 1.12 stable, 10% 1.13 canary, 1.14 loaded) on a free port."""
    with running_gateway() as running:
        yield running
