"""`FleetWindows`: the guardian leader's windows, the sum of every live process's.

Each tick the leader asks every live member for the seconds its windows changed since the
last answer (`WindowStore.export`: per series, per second, the counts each second added; only
non-zero fields, histograms as vectors) and adds them into its own windows
(`SlidingWindow.merge`). Nothing else crosses: no samples, no requests.

- The member's current second is still counting. The next pull starts from it again, and the
  leader adds only what grew since (the new counts minus those it added before), so a second
  is never counted twice, whatever the tick and the members' clocks.
- A member that does not answer is asked again next tick from where it was; what it counted
  meanwhile arrives then. One that left (its lease ran out) keeps what it had contributed.
- A new leader starts with empty windows and asks every member for everything it keeps (the
  horizon), so the rules see the same history as before, minus what only a dead process knew.
- A tick's seconds from every member are merged into each series in one pass in time order,
  however many there are (catching up after a takeover, or a member's backlog, costs one pass).
- A member missing from the list keeps its place for the horizon, so a lease renewed late
  never makes the leader pull (and count) its history twice.

The drift histograms come along, per `SLOT_SECONDS` slot instead of per second, into
`FleetHistograms`: a member gives only the slots that are over, each once and whole (so the
leader's histograms trail by at most a slot, and the bins of a slot cross the wire once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from gateway.orchestration.fleet import Fleet, Member
from gateway.orchestration.fleet_drift import FleetHistograms
from gateway.telemetry.drift import DriftTracker, HistogramKey
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.windows import Counts, SeriesKey, WindowStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pulled:
    """One member's answer: its clock's current second and the seconds each series changed."""

    now: int
    series: dict[SeriesKey, list[tuple[int, Counts]]]
    #: Bytes the answer took on the wire (0 for this process's own windows).
    size: int = 0
    #: Its resident memory, (second, bytes), one sample a second.
    memory: list[tuple[int, int]] = field(default_factory=list)
    #: Its drift histograms: per series and bins, the slots (first second, counters) that changed.
    histograms: dict[HistogramKey, list[tuple[int, np.ndarray]]] = field(default_factory=dict)


#: Asks several members at once for their seconds from `since`; None for a member that did not answer.
Puller = Callable[[Sequence[tuple[Member, int]]], list[Pulled | None]]


@dataclass
class _Cursor:
    """Where the leader is with one member: the second to ask from, and the current second's counts it added."""

    since: int = 0
    counting: dict[SeriesKey, tuple[int, Counts]] = field(default_factory=dict)
    #: When the member was last listed (the leader's clock).
    seen: float = 0.0


@dataclass(frozen=True)
class Refresh:
    """What one refresh pulled: members asked and answered, bytes, seconds merged, and the time it took."""

    members: int
    answered: int
    size: int
    seconds: int
    cpu_seconds: float


class FleetWindows:
    """Owns the leader's merged windows and, per member, how far they have been pulled."""

    def __init__(
        self, local: WindowStore, member_id: str, puller: Puller | None = None, *, drift: DriftTracker | None = None
    ) -> None:
        self._local = local
        self._member_id = member_id
        self.puller = puller
        self._drift = drift
        self.merged = WindowStore(local.horizon, clock=local.clock)
        #: The fleet's drift histograms (None: this process counts none).
        self.histograms = FleetHistograms(drift) if drift is not None else None
        self._cursors: dict[str, _Cursor] = {}
        #: The other members' resident memory (memory_growth watches every process), by member id.
        self.memory: dict[str, tuple[str, MemoryWindow]] = {}

    def reset(self) -> WindowStore:
        """Start over (a new leadership): empty windows, every member pulled from the start of its history."""
        self.merged = WindowStore(self._local.horizon, clock=self._local.clock)
        self.histograms = FleetHistograms(self._drift) if self._drift is not None else None
        self._cursors = {}
        self.memory = {}
        return self.merged

    def _pull(self, asks: list[tuple[Member, int]]) -> list[Pulled | None]:
        remote = [(m, since) for m, since in asks if m.id != self._member_id]
        answers = iter(self.puller(remote) if self.puller is not None and remote else [None] * len(remote))
        pulled: list[Pulled | None] = []
        for member, since in asks:
            if member.id == self._member_id:
                now, series = self._local.export(since)
                histograms = self._drift.export(since) if self._drift is not None else {}
                pulled.append(Pulled(now, series, histograms=histograms))
            else:
                pulled.append(next(answers))
        return pulled

    def _keep_memory(self, member: Member, samples: list[tuple[int, int]]) -> None:
        _, memory = self.memory.setdefault(
            member.id, (member.process, MemoryWindow(self._local.horizon, clock=self._local.clock))
        )
        for second, value in samples:
            memory.put(second, value)

    def refresh(self, members: Sequence[Member]) -> Refresh:
        """Pull every member's new seconds and add them into the merged windows."""
        started = time.process_time()
        asks = [(m, self._cursors[m.id].since if m.id in self._cursors else 0) for m in members]
        if not any(m.id == self._member_id for m in members):
            asks.append((Member(self._member_id, "", "", 0.0), self._cursors.get(self._member_id, _Cursor()).since))
        batch: dict[SeriesKey, list[tuple[int, Counts]]] = {}
        slots: dict[HistogramKey, list[tuple[int, np.ndarray]]] = {}
        answered = size = 0
        for (member, _), pulled in zip(asks, self._pull(asks), strict=True):
            if pulled is None:
                continue
            answered += 1
            size += pulled.size
            cursor = self._cursors.setdefault(member.id, _Cursor())
            if pulled.memory and member.id != self._member_id:
                self._keep_memory(member, pulled.memory)
            _grown_seconds(cursor, pulled, batch)
            for histogram, finished in pulled.histograms.items():
                slots.setdefault(histogram, []).extend(finished)
            cursor.since = pulled.now
        merged = 0
        for key, seconds in batch.items():
            self.merged.window(key).merge(sorted(seconds, key=lambda item: item[0]))
            merged += len(seconds)
        if self.histograms is not None:
            for histogram, changed in slots.items():
                self.histograms.merge(histogram, changed)
            self.histograms.forget_stale()
        # A member missing from the list keeps its cursor for the horizon: were it listed again (a
        # lease renewed late), it must not be pulled from the start and counted twice.
        now = self._local.clock()
        for member, _ in asks:
            self._cursors.setdefault(member.id, _Cursor()).seen = now
        self._cursors = {m: c for m, c in self._cursors.items() if now - c.seen <= self._local.horizon}
        self.memory = {m: held for m, held in self.memory.items() if m in self._cursors}
        return Refresh(len(asks), answered, size, merged, time.process_time() - started)


class GuardianLeadership:
    """The guardian's terms as the fleet's leader: each tick, whether this process leads and on what windows.

    While it leads, every tick pulls the members' new seconds into the merged windows and runs
    with the leader's writes fenced; a new term starts from empty windows pulled from the start.
    """

    def __init__(self, fleet: Fleet, windows: FleetWindows) -> None:
        self._fleet = fleet
        self.windows = windows
        self._leading = False
        #: What the last tick's refresh pulled (benchmarks, status).
        self.last: Refresh | None = None

    def memory(self) -> dict[str, MemoryWindow]:
        """The other live processes' resident memory, by process name (what the last pull brought)."""
        return dict(self.windows.memory.values())

    def drift(self) -> FleetHistograms | None:
        """The fleet's drift histograms of this term (None: this process counts none)."""
        return self.windows.histograms

    @contextmanager
    def term(self) -> Iterator[WindowStore | None]:
        """The merged windows with this tick's counts, writes fenced; None when this process does not lead."""
        if not self._fleet.is_leader():
            self._leading = False
            yield None
            return
        if not self._leading:
            self.windows.reset()
            self._leading = True
        self.last = self.windows.refresh(self._fleet.members())
        with self._fleet.fence():
            yield self.windows.merged


def _grown_seconds(cursor: _Cursor, pulled: Pulled, into: dict[SeriesKey, list[tuple[int, Counts]]]) -> None:
    """What a member's seconds added since the last pull (into `into`); its current second noted."""
    for key, seconds in pulled.series.items():
        before = cursor.counting.get(key)
        for second, counts in seconds:
            grown = minus(counts, before[1]) if before is not None and before[0] == second else counts
            if grown:
                into.setdefault(key, []).append((second, grown))
    cursor.counting = {
        key: seconds[-1] for key, seconds in pulled.series.items() if seconds and seconds[-1][0] == pulled.now
    }


def minus(counts: Counts, before: Counts) -> Counts:
    """What `counts` has beyond `before` (the same second, pulled twice), field by field."""
    grown: Counts = {}
    for name, value in counts.items():
        old = before.get(name)
        if old is None:
            grown[name] = value
        elif isinstance(value, int | float) and isinstance(old, int | float):
            if value != old:
                grown[name] = value - old
        else:
            vector, previous = np.asarray(value), np.asarray(old)
            delta = vector.astype(np.float64 if vector.dtype.kind == "f" else np.int64)
            size = min(len(delta), len(previous))
            delta[:size] -= previous[:size]
            if delta.any():
                grown[name] = delta
    return grown
