"""Process memory growth, attributed to a version by timing.

Every version of every endpoint shares one process, so the gateway cannot measure memory per
version. What it can say: when each version was loaded and when it started serving (taking
weighted or shadow traffic), and how resident memory moved since. `MemoryAttribution` names
the suspect: of the versions other than their endpoint's stable, the one whose latest such
event is the most recent (a tie names nobody). Growth is measured over the rule's window but
only since that event (a model's own load is not growth), from the lowest sample to the
latest. Every incident says the attribution is by timing, and when each event happened.

With many processes, the guardian leader also reads every other live process's samples
(`others`, pulled with their window counts) and judges the process that grew the most.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.desired import DesiredState
from gateway.errors import GatewayError
from gateway.registry import ModelRegistry
from gateway.routing import STABLE
from gateway.telemetry.memory import Growth, MemoryWindow

MB = 1_000_000


def _clock_text(at: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(at))


@dataclass(frozen=True)
class MemoryEvidence:
    """Growth over a rule's window and whether it is attributed to the candidate asked about."""

    grown_mb: float
    samples: int
    attributed: bool
    detail: str
    values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Event:
    endpoint: str
    version: str
    at: float
    what: str  # "loaded" or "started serving"


class MemoryAttribution:
    """Samples resident memory every tick and remembers when versions started serving."""

    def __init__(self, memory: MemoryWindow, registry: ModelRegistry, clock: Callable[[], float]) -> None:
        self.memory = memory
        self._registry = registry
        self._clock = clock
        self._serving_since: dict[tuple[str, str], float] = {}
        self._suspects: list[_Event] = []
        #: The other processes' memory, by process name (the guardian leader's view of the fleet).
        self.others: Callable[[], Mapping[str, MemoryWindow]] | None = None

    def _growth(self, seconds: int, since: float = 0.0) -> tuple[str, Growth]:
        """The largest growth of any process: ("" for this one, or the other's name, its growth)."""
        grown = [("", self.memory.growth(seconds, since))]
        if self.others is not None:
            grown += [(name, window.growth(seconds, since)) for name, window in self.others().items()]
        return max(grown, key=lambda item: item[1].grown_bytes)

    def observe(self, state: DesiredState) -> None:
        """One tick: sample memory; note versions that started or stopped serving; find the suspect."""
        self.memory.sample()
        now = self._clock()
        serving = {
            (name, version)
            for name, ep in state.endpoints.items()
            for version in {*ep.weights, *ep.shadows}
            if version != ep.labels.get(STABLE)
        }
        self._serving_since = {key: self._serving_since.get(key, now) for key in serving}
        events = []
        for name, ep in state.endpoints.items():
            for version in ep.versions:
                if version == ep.labels.get(STABLE):
                    continue
                try:
                    loaded = self._registry.get(name, version).loaded_at
                except GatewayError:
                    continue
                since = self._serving_since.get((name, version))
                if since is not None and since >= loaded:
                    events.append(_Event(name, version, since, "started serving"))
                elif loaded:
                    events.append(_Event(name, version, loaded, "loaded"))
        latest = max((e.at for e in events), default=None)
        self._suspects = [e for e in events if e.at == latest]

    def evidence(self, endpoint: str, candidate: str, seconds: int) -> MemoryEvidence:
        """The growth the candidate would answer for, and whether timing points at it."""
        if not self._suspects:
            _, grown = self._growth(seconds)
            return MemoryEvidence(grown.grown_bytes / MB, grown.samples, False, "no version to attribute growth to")
        suspect = self._suspects[0]
        process, grown = self._growth(seconds, since=suspect.at)
        values = {
            "lowest_mb": grown.lowest_bytes / MB,
            "latest_mb": grown.latest_bytes / MB,
            "grown_mb": grown.grown_bytes / MB,
        }
        whose = f"the resident memory of process {process}" if process else "process resident memory"
        said = (
            f"{whose} grew {grown.grown_bytes / MB:.0f} MB (from {grown.lowest_bytes / MB:.0f} MB "
            f"at {_clock_text(grown.lowest_at)} to {grown.latest_bytes / MB:.0f} MB) since "
            f"{suspect.endpoint} {suspect.version} {suspect.what} at {_clock_text(suspect.at)} UTC"
        )
        if len(self._suspects) > 1:
            names = ", ".join(f"{e.endpoint} {e.version}" for e in self._suspects)
            return MemoryEvidence(
                grown.grown_bytes / MB, grown.samples, False, f"{said}; cannot tell apart by timing: {names}", values
            )
        if (suspect.endpoint, suspect.version) != (endpoint, candidate):
            detail = f"{said}; attributed by timing to {suspect.endpoint} {suspect.version}, not {candidate}"
            return MemoryEvidence(grown.grown_bytes / MB, grown.samples, False, detail, values)
        detail = (
            f"{said}; attributed to {candidate} by timing only (the version that most recently was loaded or "
            "started serving): the gateway measures memory per process, not per version"
        )
        return MemoryEvidence(grown.grown_bytes / MB, grown.samples, True, detail, values)
