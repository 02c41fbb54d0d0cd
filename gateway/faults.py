"""Fault injection for drills and tests: per version, an error rate and added latency.

Faults are desired state like routes (set through the control plane, audited); this holds
the current ones for the data plane and the shadow runner to consult. With no faults set,
checking costs one truth test.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.errors import GatewayError, InvalidInput, NotReady


class InjectedFault(NotReady):
    """An error raised on purpose by a fault drill (reported as UNAVAILABLE)."""


@dataclass(frozen=True)
class Fault:
    """What to do to a version's requests: fail a share of them, and/or delay them."""

    error_rate: float = 0.0
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise InvalidInput(f"error_rate {self.error_rate} must be between 0 and 1", field="error_rate")
        if not 0.0 <= self.latency_ms <= 60_000:
            raise InvalidInput(f"latency_ms {self.latency_ms} must be between 0 and 60000", field="latency_ms")

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"error_rate": self.error_rate, "latency_ms": self.latency_ms}

    def error(self, endpoint: str, version: str) -> GatewayError | None:
        """The injected error for one request, or None (drawn at `error_rate`)."""
        if self.error_rate and random.random() < self.error_rate:
            return InjectedFault(f"{endpoint} {version}: injected fault (error_rate {self.error_rate:g})")
        return None


class FaultInjector:
    """The faults in force, by (endpoint, version). Replaced whole, read lock-free."""

    def __init__(self) -> None:
        self.faults: Mapping[tuple[str, str], Fault] = MappingProxyType({})

    def replace(self, faults: Mapping[tuple[str, str], Fault]) -> None:
        """Install a new set of faults."""
        self.faults = MappingProxyType(dict(faults))

    def get(self, endpoint: str, version: str) -> Fault | None:
        """The fault of a version, if any."""
        faults = self.faults
        return faults.get((endpoint, version)) if faults else None
