"""`gateway.v1.Fleet`: the calls between the processes of one gateway, both sides, and their converters.

Every `gateway serve` process runs a `FleetServer` on its own listener (`--fleet-listen`; never
shared between workers, so each process can be asked on its own) and registers its address
in the store. `FleetPeers` is the calling side: the guardian leader's `pull_windows` (one call
per member, all in flight at once, each bounded by `PULL_TIMEOUT`), and `shadow_summaries`
for a fleet-wide shadow report. Calls carry the fleet's token (`FleetKey.peer_token`).

With TLS on (`--tls-cert`/`--tls-key`), the fleet listener serves TLS like the other
listeners (mutual TLS with `--tls-client-ca`, reloaded on SIGHUP with them), and the calling
side verifies each peer's certificate (`--fleet-tls-ca`), showing its own under mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from gateway.app import Gateway
from gateway.auth import FleetKey
from gateway.grpc.errors import guard_threaded_servicer
from gateway.grpc.server import authorization, bind, server_options
from gateway.grpc.tls import ClientTls, ServerTls
from gateway.orchestration.fleet import Fleet, Member
from gateway.orchestration.fleet_windows import Pulled
from gateway.pb.gateway.v1 import fleet_pb2 as pb
from gateway.pb.gateway.v1 import fleet_pb2_grpc as pb_grpc
from gateway.shadow.stats import DIFF_EDGES, ShadowStats, ShadowSummary
from gateway.telemetry.drift import DriftTracker, HistogramKey
from gateway.telemetry.memory import MemoryWindow
from gateway.telemetry.windows import Counts, SeriesKey, WindowStore

log = logging.getLogger(__name__)

FLEET = pb.DESCRIPTOR.services_by_name["Fleet"]
#: The longest the leader waits for one member's counts in a tick (a slow member is asked again next tick).
PULL_TIMEOUT = 2.0
SHADOW_TIMEOUT = 10.0


# --- converters ---------------------------------------------------------------------------------


def _sparse(vector: np.ndarray) -> pb.Sparse:
    index = np.flatnonzero(vector)
    if vector.dtype.kind == "f":
        return pb.Sparse(index=index.tolist(), reals=vector[index].tolist())
    return pb.Sparse(index=index.tolist(), integers=vector[index].tolist())


def _dense(sparse: pb.Sparse) -> np.ndarray:
    index = np.asarray(sparse.index, dtype=np.intp)
    values = np.asarray(sparse.reals if sparse.reals else sparse.integers)
    vector = np.zeros(int(index.max()) + 1 if len(index) else 0, dtype=values.dtype if len(values) else np.int64)
    vector[index] = values
    return vector


def window_counts(
    now: int,
    series: dict[SeriesKey, list[tuple[int, Counts]]],
    memory: Sequence[tuple[int, int]] = (),
    histograms: Mapping[HistogramKey, list[tuple[int, np.ndarray]]] | None = None,
) -> pb.WindowCounts:
    """A member's export as the wire carries it (field names once, then indices), with memory and histograms."""
    names: dict[str, int] = {}
    out = pb.WindowCounts(now_second=now, memory=[pb.MemorySample(second=t, bytes=b) for t, b in memory])
    for histogram, slots in (histograms or {}).items():
        out.histograms.add(
            endpoint=histogram.endpoint,
            version=histogram.version,
            bins=histogram.bins,
            size=len(slots[0][1]) if slots else 0,
            slots=[pb.HistogramSlot(second=second, counts=_sparse(counts)) for second, counts in slots],
        )
    for key, seconds in series.items():
        wire = out.series.add(endpoint=key.endpoint, version=key.version, pinned=key.pinned)
        for second, counts in seconds:
            fields = wire.seconds.add(second=second).fields
            for name, value in counts.items():
                field = names.setdefault(name, len(names))
                if isinstance(value, np.ndarray):
                    fields.add(field=field, vector=_sparse(value))
                elif isinstance(value, float):
                    fields.add(field=field, real=value)
                else:
                    fields.add(field=field, integer=int(value))
    out.fields.extend(names)
    return out


def pulled(answer: pb.WindowCounts) -> Pulled:
    """The leader's side of `window_counts`."""
    names = list(answer.fields)
    series: dict[SeriesKey, list[tuple[int, Counts]]] = {}
    for wire in answer.series:
        seconds = series.setdefault(SeriesKey(wire.endpoint, wire.version, wire.pinned), [])
        for second in wire.seconds:
            counts: Counts = {}
            for field in second.fields:
                kind = field.WhichOneof("value")
                name = names[field.field]
                if kind == "vector":
                    counts[name] = _dense(field.vector)
                elif kind == "real":
                    counts[name] = field.real
                else:
                    counts[name] = field.integer
            seconds.append((second.second, counts))
    memory = [(sample.second, sample.bytes) for sample in answer.memory]
    histograms = {
        HistogramKey(wire.endpoint, wire.bins, wire.version): [
            (slot.second, _sized(_dense(slot.counts), wire.size)) for slot in wire.slots
        ]
        for wire in answer.histograms
    }
    return Pulled(answer.now_second, series, answer.ByteSize(), memory, histograms)


def _sized(vector: np.ndarray, size: int) -> np.ndarray:
    """A dense vector of exactly `size` (the sparse form drops trailing zeros; more than `size` is cut)."""
    out = np.zeros(size, dtype=np.int64)
    out[: min(size, len(vector))] = vector[:size]
    return out


def shadow_summary(summary: ShadowSummary) -> pb.ShadowSummary:
    """A shadow summary on the wire."""
    return pb.ShadowSummary(
        seen=summary.seen,
        mirrored=summary.mirrored,
        compared=summary.compared,
        dropped=summary.dropped,
        errors=summary.errors,
        decisions=summary.decisions,
        agree=summary.agree,
        diff_bins=pb.Sparse(index=list(summary.diff_bins), integers=list(summary.diff_bins.values())),
        diff_max=summary.diff_max,
        diff_decades=summary.diff_decades,
        primary_latency=pb.Sparse(index=list(summary.primary_latency), integers=list(summary.primary_latency.values())),
        shadow_latency=pb.Sparse(index=list(summary.shadow_latency), integers=list(summary.shadow_latency.values())),
        top=[pb.Divergent(request_id=r, max_abs_diff=d) for r, d in summary.top],
        primary_versions=sorted(summary.primary_versions),
        latency_samples=summary.latency_samples,
    )


def _bins(sparse: pb.Sparse) -> dict[int, int]:
    return dict(zip(sparse.index, sparse.integers, strict=True))


def from_shadow_summary(endpoint: str, version: str, window: int, wire: pb.ShadowSummary) -> ShadowSummary:
    """The inverse of `shadow_summary`."""
    decades = list(wire.diff_decades)
    return ShadowSummary(
        endpoint,
        version,
        window,
        seen=wire.seen,
        mirrored=wire.mirrored,
        compared=wire.compared,
        dropped=wire.dropped,
        errors=dict(wire.errors),
        decisions=wire.decisions,
        agree=wire.agree,
        diff_bins=_bins(wire.diff_bins),
        diff_max=wire.diff_max,
        diff_decades=decades if len(decades) == len(DIFF_EDGES) else [0] * len(DIFF_EDGES),
        primary_latency=_bins(wire.primary_latency),
        shadow_latency=_bins(wire.shadow_latency),
        top=[(d.request_id, d.max_abs_diff) for d in wire.top],
        primary_versions=set(wire.primary_versions),
        latency_samples=wire.latency_samples,
    )


# --- the serving side ---------------------------------------------------------------------------


class FleetServicer(pb_grpc.FleetServicer):
    """Answers the other processes: this process's window counts and shadow summaries."""

    def __init__(self, windows: WindowStore, shadow: ShadowStats, memory: MemoryWindow, drift: DriftTracker) -> None:
        self._windows = windows
        self._shadow = shadow
        self._memory = memory
        self._drift = drift

    def PullWindows(self, request: pb.PullWindowsRequest, context: object) -> pb.WindowCounts:
        """Window counts of this process from a second on, its memory samples and its drift histograms."""
        since = request.since_second
        now, series = self._windows.export(since)
        return window_counts(now, series, self._memory.export(since), self._drift.export(since))

    def PullShadowSummary(self, request: pb.PullShadowSummaryRequest, context: object) -> pb.ShadowSummary:
        """A summary of one shadow in this process over a window (none asked: which shadows it has seen)."""
        seen = sorted(version for endpoint, version in self._shadow.shadows() if endpoint == request.endpoint)
        if not request.shadow_version:
            return pb.ShadowSummary(shadows_seen=seen)
        summary = self._shadow.summary(
            request.endpoint, request.shadow_version, request.window_seconds or 3600, request.top or 10
        )
        answer = shadow_summary(summary)
        answer.shadows_seen.extend(seen)
        return answer


def _peer_authenticator(key: FleetKey) -> Any:
    def authenticate(context: grpc.ServicerContext) -> str:
        key.check_peer(authorization(context.invocation_metadata()))
        return "fleet"

    return authenticate


@dataclass
class FleetServer:
    """A started fleet listener, the peers client, and this process's membership in the store."""

    server: grpc.Server
    port: int
    address: str
    peers: FleetPeers
    fleet: Fleet

    async def stop(self, grace: float = 1.0) -> None:
        """Leave the fleet, then stop answering."""
        await asyncio.to_thread(self.fleet.stop)
        await asyncio.to_thread(lambda: self.server.stop(grace).wait())
        self.peers.close()


def advertised(listen: str, port: int, advertise: str = "") -> str:
    """HOST:PORT other processes reach this one at."""
    host = advertise or listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def _loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


async def start_fleet(gateway: Gateway, listen: str, advertise: str = "", tls: ServerTls | None = None) -> FleetServer:
    """Start the fleet listener and join the fleet with its address; the guardian then acts while it leads.

    `tls`: the listeners' TLS, served here too; the other processes are then called over TLS,
    verified against `fleet_tls_ca` of the gateway's settings.
    """
    key = gateway.fleet_key
    assert key is not None, "gateway.start() reads the fleet key first"
    settings = gateway.settings
    client = ClientTls.for_fleet(tls, settings.fleet_tls_ca, settings.fleet_tls_server_name)
    if tls is None and not _loopback(listen):
        log.warning(
            "the fleet listener on %s is plaintext: its token and window counts cross the network in the clear; "
            "serve TLS (--tls-cert, --tls-key, and --fleet-tls-ca for the peers' CA) across hosts",
            listen,
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fleet"),
        options=server_options(gateway.settings.max_message_bytes),
    )
    pb_grpc.add_FleetServicer_to_server(
        guard_threaded_servicer(
            FleetServicer(
                gateway.telemetry.windows, gateway.shadow.stats, gateway.telemetry.memory, gateway.telemetry.drift
            ),
            FLEET,
            _peer_authenticator(key),
        ),
        server,
    )
    port = bind(server, listen, tls)
    server.start()
    address = advertised(listen, port, advertise)
    peers = FleetPeers(key, gateway.fleet, settings.max_message_bytes, tls=client)
    try:
        await asyncio.to_thread(gateway.join_fleet, address, peers.pull_windows)
    except BaseException:
        server.stop(0)
        peers.close()
        raise
    return FleetServer(server, port, address, peers, gateway.fleet)


# --- the calling side ---------------------------------------------------------------------------


class FleetPeers:
    """Channels to the other live processes (opened on first use, closed when they leave) and the calls on them."""

    def __init__(
        self, key: FleetKey, fleet: Fleet, max_message_bytes: int = 4 * 1024 * 1024, *, tls: ClientTls | None = None
    ) -> None:
        self._metadata = (("authorization", f"Bearer {key.peer_token}"),)
        self._fleet = fleet
        self._options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes)]
        self._tls = tls
        self._generation = 0  # of the TLS files the open channels were made with
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.FleetStub]] = {}
        self._lock = threading.Lock()
        self._silent: set[str] = set()  # members whose last pull failed (logged once, not every tick)

    def _stub(self, address: str) -> pb_grpc.FleetStub:
        tls = self._tls
        if tls is not None and tls.current()[0] != self._generation:
            self._forget_except(set())  # certificates rotated (SIGHUP): new channels, with the new files
            self._generation = tls.current()[0]
        with self._lock:
            held = self._channels.get(address)
            if held is None:
                channel = (
                    tls.channel(address, self._options)
                    if tls is not None
                    else grpc.insecure_channel(address, options=self._options)
                )
                held = self._channels[address] = (channel, pb_grpc.FleetStub(channel))
            return held[1]

    def _forget_except(self, addresses: set[str]) -> None:
        with self._lock:
            gone = [address for address in self._channels if address not in addresses]
            for address in gone:
                self._channels.pop(address)[0].close()

    def pull_windows(self, asks: Sequence[tuple[Member, int]]) -> list[Pulled | None]:
        """Every asked member's seconds from its `since`, all calls in flight at once; None where one failed."""
        self._forget_except({m.address for m, _ in asks} | {m.address for m in self._fleet.members()})
        calls: list[Any] = []
        for member, since in asks:
            if not member.address:
                calls.append(None)
                continue
            stub = self._stub(member.address)
            request = pb.PullWindowsRequest(since_second=since)
            calls.append(stub.PullWindows.future(request, metadata=self._metadata, timeout=PULL_TIMEOUT))
        answers: list[Pulled | None] = []
        for (member, _), call in zip(asks, calls, strict=True):
            try:
                answers.append(pulled(call.result()) if call is not None else None)
            except grpc.RpcError as err:
                if member.id not in self._silent:
                    log.warning(
                        "no window counts from %s (%s): %s; asking again each tick while it is a member",
                        member.process, member.address, err.code().name,
                    )  # fmt: skip
                self._silent.add(member.id)
                answers.append(None)
                continue
            if member.id in self._silent:
                log.warning("window counts from %s (%s) again", member.process, member.address)
                self._silent.discard(member.id)
        self._silent &= {m.id for m, _ in asks}
        return answers

    def _ask_others(self, call: Callable[[pb_grpc.FleetStub], Any]) -> list[tuple[Member, Any]]:
        """`call` on every other live member with an address, all in flight at once: (member, future)."""
        me = self._fleet.member_id
        return [(m, call(self._stub(m.address))) for m in self._fleet.members() if m.id != me and m.address]

    def shadow_summaries(self, endpoint: str, version: str, window: int, top: int) -> list[ShadowSummary]:
        """Every other live process's summary of a shadow (a process that does not answer is left out, and logged)."""
        request = pb.PullShadowSummaryRequest(endpoint=endpoint, shadow_version=version, window_seconds=window, top=top)
        calls = self._ask_others(
            lambda stub: stub.PullShadowSummary.future(request, metadata=self._metadata, timeout=SHADOW_TIMEOUT)
        )
        summaries = []
        for member, call in calls:
            try:
                summaries.append(from_shadow_summary(endpoint, version, window, call.result()))
            except grpc.RpcError as err:
                log.warning("no shadow summary from %s (%s): %s", member.process, member.address, err.code().name)
        return summaries

    def shadows_seen(self, endpoint: str) -> set[str]:
        """The endpoint's shadows every other live process has mirrored to (one that does not answer is logged)."""
        seen: set[str] = set()
        request = pb.PullShadowSummaryRequest(endpoint=endpoint)
        calls = self._ask_others(
            lambda stub: stub.PullShadowSummary.future(request, metadata=self._metadata, timeout=SHADOW_TIMEOUT)
        )
        for member, call in calls:
            try:
                seen.update(call.result().shadows_seen)
            except grpc.RpcError as err:
                log.warning("no shadows from %s (%s): %s", member.process, member.address, err.code().name)
        return seen

    def close(self) -> None:
        """Close every channel."""
        self._forget_except(set())
