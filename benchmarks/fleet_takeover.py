"""Issue 15's takeover figure: the guardian leader killed, how long until the survivors agree on a new one.

3 `gateway serve` processes on one etcd. Each trial waits until every process has joined and
they agree on the leader, SIGKILLs the leader, and times until every survivor names the same
new leader (`GetRoutes().fleet.leader`); a replacement process is started before the next
trial. Run for two `--fleet-lease` values: a member renews every third of its lease and bids
for the lock every second, so the expected bound is the lease plus about a second (and
etcd's own lease-expiry check, every half second).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.common import ADMIN_METADATA, Server, admin_target, start_gateway
from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc

LEASES = (3, 10)


def _fleet(server: Server) -> admin_pb.FleetStatus:
    with grpc.insecure_channel(admin_target(server)) as channel:
        routes = admin_pb2_grpc.AdminStub(channel).GetRoutes(
            admin_pb.GetRoutesRequest(), metadata=ADMIN_METADATA, timeout=10
        )
    fleet: admin_pb.FleetStatus = routes.fleet
    return fleet


def _agreed(servers: list[Server]) -> dict[str, admin_pb.FleetStatus]:
    """Every process's view once all of them have joined and name the same leader."""
    while True:
        views = {s.name: _fleet(s) for s in servers}
        leaders = {v.leader for v in views.values()}
        if len(leaders) == 1 and leaders != {""} and all(len(v.members) == len(servers) for v in views.values()):
            return views
        time.sleep(0.05)


def takeover(lease: int, trials: int) -> list[float]:
    """Seconds from SIGKILL of the leader until the survivors agree on a new one."""
    from testkit.etcd import EtcdServer

    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as scratch:
        etcd = EtcdServer(Path(scratch) / "etcd").start()
        extra = ["--store", f"etcd://{etcd.endpoint}/takeover", "--fleet-lease", str(lease)]
        servers = [start_gateway(f"p{i}", extra) for i in range(3)]
        seconds = []
        try:
            for trial in range(trials):
                views = _agreed(servers)
                old = next(iter(views.values())).leader
                leader = next(s for s in servers if views[s.name].member == old)
                leader.process.kill()
                killed = time.perf_counter()
                servers.remove(leader)
                while True:
                    leaders = {_fleet(s).leader for s in servers}
                    if len(leaders) == 1 and leaders.isdisjoint({"", old}):
                        break
                    time.sleep(0.02)
                seconds.append(time.perf_counter() - killed)
                leader.stop()  # reaps it and removes its scratch directory
                servers.append(start_gateway(f"p{3 + trial}", extra))
        finally:
            for server in servers:
                server.stop()
            etcd.kill()
    return seconds


def run(seconds: float, rounds: int, concurrencies: tuple[int, ...]) -> str:
    trials = max(3, rounds * 2)
    lines = [
        f"Leader killed (SIGKILL) -> the survivors agree on a new leader: 3 processes on etcd, {trials} trials "
        "per lease, a replacement started after each; seconds from the kill\n",
        "| --fleet-lease s | p50 s | max s | max - lease s | each |",
        "|---:|---:|---:|---:|---|",
    ]
    for lease in LEASES:
        took = sorted(takeover(lease, trials))
        each = ", ".join(f"{t:.2f}" for t in took)
        lines.append(f"| {lease} | {statistics.median(took):.2f} | {took[-1]:.2f} | {took[-1] - lease:.2f} | {each} |")
    return "\n".join(lines)
