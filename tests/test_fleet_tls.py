"""The fleet listener over TLS: served like the other listeners, and the peers' certificates verified.

Throwaway certificate authorities (`testkit.pki`): the processes' certificates come from one
CA, the operators' client certificates from another; under mutual TLS each process shows its
own certificate to the others, so the listeners trust both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gateway.grpc.fleet import FleetPeers, FleetServer, start_fleet
from gateway.grpc.server import start_inference_server
from gateway.grpc.tls import ClientTls, ServerTls
from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc, fleet_pb2, fleet_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.fleet import wait_until
from testkit.gateways import GatewayProcess, RunningGateway, bearer, predict_request, running_gateway
from testkit.pki import Authority, secure_channel, write_pems


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca, operators, rotated = Authority("gateway CA"), Authority("operators CA"), Authority("rotated CA")
    files = {"ca": ca.pem, "clients_ca": ca.pem + operators.pem, "other_ca": Authority("other CA").pem}
    files["cert"], files["key"] = ca.issue("gateway", server=True)
    files["client_cert"], files["client_key"] = operators.issue("oncall", server=False)
    files["rotated_ca"] = rotated.pem
    files["rotated_cert"], files["rotated_key"] = rotated.issue("gateway", server=True)
    return write_pems(tmp_path, files)


@dataclass
class Process:
    """One in-process gateway with its fleet listener over TLS."""

    running: RunningGateway
    tls: ServerTls
    fleet: FleetServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.fleet.port}"


@contextmanager
def two_processes(pki: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    """Two gateways on one store, their fleet listeners under mutual TLS, trusting the gateway CA."""
    with ExitStack() as stack:
        processes = []
        for _ in range(2):
            running = stack.enter_context(
                running_gateway(store_path=tmp_path / "state.db", settings={"fleet_tls_ca": pki["ca"]})
            )
            tls = ServerTls(pki["cert"], pki["key"], pki["clients_ca"])
            fleet = running.loop.run(start_fleet(running.gateway, "127.0.0.1:0", tls=tls))
            stack.callback(running.loop.run, fleet.stop(grace=0))
            processes.append(Process(running, tls, fleet))
        yield processes[0], processes[1]


def pull(peers: FleetPeers, other: Process) -> bool:
    """Whether `peers` got the other process's window counts."""
    member = other.fleet.fleet.me
    assert member is not None
    return peers.pull_windows([(member, 0)]) != [None]


def test_the_fleet_listener_serves_mutual_tls_and_the_caller_verifies_it(pki: dict[str, Path], tmp_path: Path) -> None:
    with two_processes(pki, tmp_path) as (a, b):
        assert pull(a.fleet.peers, b) and pull(b.fleet.peers, a)
        request, token = fleet_pb2.PullWindowsRequest(), a.fleet.peers._metadata
        for channel in (
            grpc.insecure_channel(b.target),  # plaintext
            secure_channel(b.target, pki["ca"]),  # TLS, but no client certificate
        ):
            with channel, pytest.raises(grpc.RpcError) as refused:
                fleet_pb2_grpc.FleetStub(channel).PullWindows(request, metadata=token, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A caller that does not trust the CA of the peer's certificate gets nothing from it.
        distrustful = ClientTls(pki["other_ca"], cert=pki["cert"], key=pki["key"])
        key = a.running.gateway.fleet_key
        assert key is not None
        stranger = FleetPeers(key, a.running.gateway.fleet, tls=distrustful)
        try:
            assert not pull(stranger, b)
        finally:
            stranger.close()


def test_a_reload_rotates_every_listener_and_the_callers_follow(pki: dict[str, Path], tmp_path: Path) -> None:
    with two_processes(pki, tmp_path) as (a, b):
        inference = b.running.loop.run(start_inference_server(b.running.gateway, "127.0.0.1:0", tls=b.tls))
        try:
            b_inference = f"127.0.0.1:{inference.port}"
            assert pull(a.fleet.peers, b)
            for name in ("cert", "key"):
                pki[name].write_bytes(pki[f"rotated_{name}"].read_bytes())
            b.tls.request_reload()  # what SIGHUP does
            # Fresh connections to both of b's TLS listeners get the rotated certificate.
            with secure_channel(b_inference, pki["rotated_ca"], pki["client_cert"], pki["client_key"]) as fresh:
                assert gw_grpc.InferenceStub(fresh).Predict(predict_request(), timeout=10).model == "ctr-ranker"
            a.fleet.peers.close()  # a's open connection would keep its session: make it handshake again
            assert not pull(a.fleet.peers, b)  # a still trusts the old CA only, and b's certificate moved on
            pki["ca"].write_bytes(pki["rotated_ca"].read_bytes())
            pki["clients_ca"].write_bytes(pki["rotated_ca"].read_bytes())
            a.tls.request_reload()  # a's certificate, key and trusted CA rotated too
            b.tls.request_reload()
            assert pull(a.fleet.peers, b)  # the caller read its files again with the listeners' reload
        finally:
            b.running.loop.run(inference.stop(grace=0))


def test_fleet_tls_settings_need_tls_on_the_listeners(pki: dict[str, Path]) -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="fleet_tls_ca and fleet_tls_server_name need tls_cert and tls_key"):
        ClientTls.for_fleet(None, pki["ca"])
    assert ClientTls.for_fleet(None, None) is None
    plain = ClientTls.for_fleet(ServerTls(pki["cert"], pki["key"]), pki["ca"])
    assert plain is not None and plain.cert is None  # no client certificate unless the peers ask for one
    mutual = ClientTls.for_fleet(ServerTls(pki["cert"], pki["key"], pki["clients_ca"]), pki["ca"], "gateway")
    assert mutual is not None and (mutual.cert, mutual.server_name) == (pki["cert"], "gateway")


class TlsMember:
    """A `gateway serve` process under mutual TLS, with an operator's channels to it."""

    def __init__(self, process: GatewayProcess, pki: dict[str, Path]) -> None:
        self.process = process
        client = (pki["client_cert"], pki["client_key"])
        self.channel = secure_channel(process.target, pki["ca"], *client)
        self.admin_channel = secure_channel(process.admin_target, pki["ca"], *client)
        self.predict_stub = gw_grpc.InferenceStub(self.channel)
        self.admin_stub = admin_pb2_grpc.AdminStub(self.admin_channel)

    def admin(self, method: str, request):  # type: ignore[no-untyped-def]
        return getattr(self.admin_stub, method)(request, metadata=bearer(), timeout=30)

    def close(self) -> None:
        self.channel.close()
        self.admin_channel.close()
        if self.process.process.poll() is None:
            self.process.stop()


@pytest.mark.slow
def test_serve_processes_pull_each_others_counts_over_mutual_tls(pki: dict[str, Path], tmp_path: Path) -> None:
    flags = (
        "--guardian-tick", "0.2", "--fleet-lease", "3",
        "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-client-ca", str(pki["clients_ca"]),
        "--fleet-tls-ca", str(pki["ca"]),
    )  # fmt: skip
    with ExitStack() as stack:
        members = []
        for _ in range(2):
            member = TlsMember(GatewayProcess(tmp_path / "state.db", *flags), pki)
            stack.callback(member.close)
            members.append(member)
        assert all("TLS" in m.process.ready_line for m in members)
        assert wait_until(lambda: members[0].admin("GetRoutes", admin_pb.GetRoutesRequest()).fleet.leader != "")
        leader_id = members[0].admin("GetRoutes", admin_pb.GetRoutesRequest()).fleet.leader
        leader = next(m for m in members if m.admin("GetRoutes", admin_pb.GetRoutesRequest()).fleet.member == leader_id)
        other = next(m for m in members if m is not leader)
        leader.admin("SetTraffic", admin_pb.SetTrafficRequest(
            endpoint="ctr-ranker", weights={"1.12": 50, "1.13": 50}, reason="test"))  # fmt: skip
        leader.admin("SetGuardrails", admin_pb.SetGuardrailsRequest(
            endpoint="ctr-ranker", rules=["error_rate > 20% for 30s min 20"], reason="test"))  # fmt: skip
        leader.admin("SetFault", admin_pb.SetFaultRequest(
            endpoint="ctr-ranker", version="1.13", error_rate=1.0, reason="drill"))  # fmt: skip

        def rolled_back() -> bool:
            # Traffic only through the process that does not lead: the leader sees it by pulling, over TLS.
            for k in range(10):
                with suppress(grpc.RpcError):
                    other.predict_stub.Predict(predict_request(routing_key=f"k{k}"), timeout=10)
            traffic = leader.admin("GetRoutes", admin_pb.GetRoutesRequest()).endpoints[0].traffic
            return int(traffic["1.13"]) == 0

        assert wait_until(rolled_back, timeout=60, interval=0.05)
        incidents = leader.admin("ListIncidents", admin_pb.ListIncidentsRequest(endpoint="ctr-ranker"))
        assert [i.action for i in incidents.incidents] == ["rollback"]
        stderr = ""
        leader.process.process.terminate()
        with suppress(Exception):
            stderr = leader.process.process.communicate(timeout=15)[1]
        assert not re.search(r"no window counts from .*UNAVAILABLE", stderr), stderr[-2000:]
