"""One gateway made of many processes decides and reports as one: real processes on a real etcd (and on SQLite).

Each process runs a guardian ticking every 0.2 s; only the elected leader acts, on every
process's counts added up. What the tests assert is what the design guarantees: one
rollback and one incident per breach, breaches seen on the merged counts that no process
sees alone, a rollout finished by the next leader, feedback counted wherever it is sent,
and the same incidents and shadow report from every process.
"""

from __future__ import annotations

import json
import random
import threading
from contextlib import ExitStack, suppress
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.pb.gateway.v1 import admin_pb2 as admin_pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.routing import EndpointRoutes
from gateway.state import open_store
from testkit.etcd import EtcdServer
from testkit.fleet import Member, start_members, wait_until
from testkit.gateways import GatewayProcess, bearer, predict_request, tensor

pytestmark = pytest.mark.slow
FAST = ("--guardian-tick", "0.2", "--fleet-lease", "3")


def admin(member: Member, method: str, request):  # type: ignore[no-untyped-def]
    return getattr(member.admin_stub, method)(request, metadata=bearer(), timeout=30)


def set_traffic(member: Member, canary: int) -> None:
    weights = {"1.12": 100 - canary, "1.13": canary}
    admin(member, "SetTraffic", admin_pb.SetTrafficRequest(endpoint="ctr-ranker", weights=weights, reason="test"))


def guardrails(member: Member, *rules: str) -> int:
    request = admin_pb.SetGuardrailsRequest(endpoint="ctr-ranker", rules=list(rules), reason="test")
    return int(admin(member, "SetGuardrails", request).revision)


def canary_share(member: Member) -> int:
    return int(member.routes().endpoints[0].traffic["1.13"])


def leader_of(members: list[Member]) -> Member:
    """The member that leads the guardian, as the members agree."""
    assert wait_until(lambda: len({m.routes().fleet.leader for m in members} - {""}) == 1, timeout=30)
    leader = members[0].routes().fleet.leader
    return next(m for m in members if m.routes().fleet.member == leader)


def guardian_rollbacks(member: Member) -> list[admin_pb.AuditEntry]:
    audit = admin(member, "GetAudit", admin_pb.GetAuditRequest(endpoint="ctr-ranker", limit=200))
    return [e for e in audit.entries if e.action == "rollback" and e.actor == "guardian"]


def incidents(member: Member) -> admin_pb.ListIncidentsResponse:
    listed: admin_pb.ListIncidentsResponse = admin(
        member, "ListIncidents", admin_pb.ListIncidentsRequest(endpoint="ctr-ranker", limit=50)
    )
    return listed


def predict(member: Member, key: str) -> gw.PredictResponse | None:
    try:
        response: gw.PredictResponse = member.predict_stub.Predict(predict_request(routing_key=key), timeout=10)
    except grpc.RpcError:  # an injected fault
        return None
    return response


class Traffic:
    """Predictions spread over the live members in a background thread."""

    def __init__(self, members: list[Member]) -> None:
        self.members = list(members)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for member in list(self.members):
                predict(member, f"u{self.sent}")
                self.sent += 1

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_a_fault_every_replica_sees_makes_one_rollback_one_incident_and_one_answer_everywhere(
    etcd: EtcdServer,
) -> None:
    with ExitStack() as stack:
        members = start_members(stack, etcd.url(), 3, *FAST)
        set_traffic(members[0], 50)
        guardrails(members[1], "error_rate > 20% for 30s min 20")
        fault = admin_pb.SetFaultRequest(endpoint="ctr-ranker", version="1.13", error_rate=1.0, reason="drill")
        admin(members[2], "SetFault", fault)
        with Traffic(members):
            # Every process sees enough failures to breach on its own: only the leader may act.
            assert wait_until(lambda: all(canary_share(m) == 0 for m in members), timeout=60)
            served = max(int(m.routes().revision) for m in members)
            assert wait_until(lambda: all(m.served_revision() >= served for m in members))
            for _ in range(10):  # a few more ticks of every guardian, with traffic still flowing
                assert len(guardian_rollbacks(members[0])) == 1
                wait_until(lambda: False, timeout=0.3)
        listed = [incidents(m) for m in members]
        assert len(listed[0].incidents) == 1 and listed[0].incidents[0].action == "rollback"
        assert listed[0] == listed[1] == listed[2]  # the same answer whichever process is asked
        assert len(guardian_rollbacks(members[1])) == 1

        # The shadow report adds up every process's comparisons, and reads the same from each.
        shadow = admin_pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=100, reason="dark launch")
        admin(members[0], "SetShadow", shadow)
        revision = int(members[0].routes().revision)
        assert wait_until(lambda: all(m.served_revision() >= revision for m in members))
        for i, member in enumerate(members):
            for k in range(10 * (i + 1)):
                assert predict(member, f"shadow-{i}-{k}") is not None

        def report(member: Member) -> admin_pb.ShadowReport:
            request = admin_pb.GetShadowReportRequest(endpoint="ctr-ranker", window_seconds=3600)
            shadow_report: admin_pb.ShadowReport = admin(member, "GetShadowReport", request)
            return shadow_report

        # 60 copies, plus the probes that checked each process serves the shadow's revision.
        assert wait_until(lambda: report(members[0]).compared >= 60, timeout=30)
        assert wait_until(lambda: report(members[0]) == report(members[1]) == report(members[2]), timeout=30)
        settled = report(members[0])
        assert settled.processes == 3 and settled.mirrored == settled.compared >= 60  # no process saw more than 33


def test_a_ctr_drop_split_over_three_replicas_each_below_the_minimum_is_seen_on_the_merged_counts(
    etcd: EtcdServer,
) -> None:
    minimum = 300
    with ExitStack() as stack:
        members = start_members(stack, etcd.url(), 3, *FAST)
        set_traffic(members[0], 50)
        revision = guardrails(members[0], f"ctr_drop > 10% p < 0.05 for 10m min {minimum}")
        assert wait_until(lambda: all(m.served_revision() >= revision for m in members))
        wait_until(lambda: False, timeout=2)  # the leader's ticks start the CTR test before the traffic
        rng = random.Random(11)
        served = {(i, arm): 0 for i in range(3) for arm in ("stable", "canary")}
        for round_ in range(260):
            for i, member in enumerate(members):
                response = predict(member, f"user-{round_}-{i}")
                assert response is not None
                served[(i, response.arm)] += 1
                clicked = rng.random() < (0.1 if response.arm == "canary" else 0.5)
                # The outcome goes to another process than the one that served the request.
                other = members[(i + 1) % 3]
                request = gw.FeedbackRequest(feedback_id=response.feedback_id, outcome=float(clicked))
                answer = other.predict_stub.Feedback(request, timeout=10)
                assert (answer.result, answer.version, answer.arm) == (
                    gw.FEEDBACK_RESULT_JOINED, response.version, response.arm,
                )  # fmt: skip
        assert all(count < minimum for count in served.values())  # no process alone has enough samples
        assert wait_until(lambda: all(canary_share(m) == 0 for m in members), timeout=60)
        (incident,) = incidents(members[2]).incidents
        (verdict,) = [v for v in json.loads(incident.record)["verdicts"] if v["status"] == "breach"]
        assert verdict["metric"] == "ctr_drop"
        assert min(verdict["samples"].values()) >= minimum  # the merged counts
        assert len(guardian_rollbacks(members[1])) == 1

        genuine = predict(members[0], "one-more")
        assert genuine is not None
        forged = gw.FeedbackRequest(feedback_id=genuine.feedback_id[:-6] + "forged", outcome=1.0)
        answer = members[1].predict_stub.Feedback(forged, timeout=10)
        assert (answer.joined, answer.result) == (False, gw.FEEDBACK_RESULT_FORGED)


def test_the_leader_killed_mid_rollout_another_takes_over_and_completes_it(etcd: EtcdServer) -> None:
    with ExitStack() as stack:
        members = start_members(stack, etcd.url(), 3, *FAST)
        with Traffic(members) as traffic:
            start = admin_pb.StartRolloutRequest(
                endpoint="ctr-ranker", version="1.14", steps=[10, 50, 100], step_seconds=3,
                guardrails=["error_rate > 50% for 10s min 3"], reason="ship 1.14",
            )  # fmt: skip
            admin(members[0], "StartRollout", start)

            def rollout(member: Member) -> admin_pb.RolloutStatus:
                status: admin_pb.RolloutStatus = admin(
                    member, "GetRollout", admin_pb.RolloutRequest(endpoint="ctr-ranker")
                )
                return status

            assert wait_until(lambda: rollout(members[0]).step_index >= 1, timeout=60)
            first = leader_of(members)
            assert rollout(first).status == "running" and rollout(first).step_index == 1
            first.process.kill()
            survivors = [m for m in members if m is not first]
            traffic.members = survivors
            assert wait_until(lambda: rollout(survivors[0]).status == "completed", timeout=60)
            second = leader_of(survivors)
            assert second is not first
        done = rollout(survivors[1])
        assert [e.event.split(" ")[0] for e in done.history] == ["started", "advanced", "promoted"]
        routes = survivors[1].routes().endpoints[0]
        assert (dict(routes.traffic), routes.labels["stable"]) == ({"1.14": 100}, "1.14")
        promotions = admin(survivors[0], "GetAudit", admin_pb.GetAuditRequest(endpoint="ctr-ranker", limit=100))
        assert [e.action for e in promotions.entries].count("promote") == 1


def _fresh(target: str, method: str, request):  # type: ignore[no-untyped-def]
    """An admin call on a new connection: SO_REUSEPORT hands it to either worker."""
    with grpc.insecure_channel(target) as channel:
        return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, metadata=bearer(), timeout=30)


def test_two_workers_on_sqlite_make_one_rollback_and_give_one_answer(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "state.db", "--workers", "2", *FAST)
    try:
        target = gateway.admin_target
        _fresh(target, "SetTraffic", admin_pb.SetTrafficRequest(
            endpoint="ctr-ranker", weights={"1.12": 50, "1.13": 50}, reason="test"))  # fmt: skip
        _fresh(target, "SetGuardrails", admin_pb.SetGuardrailsRequest(
            endpoint="ctr-ranker", rules=["error_rate > 20% for 30s min 20"], reason="test"))  # fmt: skip
        _fresh(target, "SetFault", admin_pb.SetFaultRequest(
            endpoint="ctr-ranker", version="1.13", error_rate=1.0, reason="drill"))  # fmt: skip
        fleet = _fresh(target, "GetRoutes", admin_pb.GetRoutesRequest()).fleet
        assert len(fleet.members) == 2 and fleet.leader in {m.id for m in fleet.members}

        def rolled_back() -> bool:
            for k in range(20):  # fresh connections reach both workers
                with grpc.insecure_channel(gateway.target) as channel, suppress(grpc.RpcError):
                    gw_grpc.InferenceStub(channel).Predict(predict_request(routing_key=f"k{k}"), timeout=10)
            routes = _fresh(target, "GetRoutes", admin_pb.GetRoutesRequest())
            return int(routes.endpoints[0].traffic["1.13"]) == 0

        assert wait_until(rolled_back, timeout=90, interval=0.1)
        answers = set()
        workers = set()
        for _ in range(30):
            workers.add(_fresh(target, "GetRoutes", admin_pb.GetRoutesRequest()).process)
            listed = _fresh(target, "ListIncidents", admin_pb.ListIncidentsRequest(endpoint="ctr-ranker"))
            answers.add(listed.SerializeToString(deterministic=True))
        assert len(workers) == 2  # both workers answered
        assert len(answers) == 1  # with one answer
        (listed,) = [admin_pb.ListIncidentsResponse.FromString(a) for a in answers]
        assert [i.action for i in listed.incidents] == ["rollback"]
        audit = _fresh(target, "GetAudit", admin_pb.GetAuditRequest(endpoint="ctr-ranker", limit=100))
        assert [e.actor for e in audit.entries if e.action == "rollback"] == ["guardian"]
    finally:
        if gateway.process.poll() is None:
            gateway.stop()


def test_a_shadow_only_another_process_mirrored_to_is_reported_from_any(tmp_path: Path) -> None:
    with ExitStack() as stack:
        asked, mirrored = start_members(stack, tmp_path / "state.db", 2, *FAST)
        on = admin_pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=100, reason="dark launch")
        revision = int(admin(asked, "SetShadow", on).revision)
        assert wait_until(lambda: mirrored.served_revision() >= revision)
        for k in range(20):  # only this process mirrors to the shadow
            assert predict(mirrored, f"mirrored-{k}") is not None
        off = admin_pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=0, reason="done")
        revision = int(admin(asked, "SetShadow", off).revision)  # `asked` never served a request meanwhile
        assert wait_until(lambda: mirrored.served_revision() >= revision)

        def report(member: Member, version: str) -> admin_pb.ShadowReport:
            request = admin_pb.GetShadowReportRequest(endpoint="ctr-ranker", shadow_version=version)
            answer: admin_pb.ShadowReport = admin(member, "GetShadowReport", request)
            return answer

        assert wait_until(lambda: report(mirrored, "1.14").compared >= 20, timeout=30)
        # The process asked never mirrored to 1.14, and 1.14 is no longer a shadow: the fleet has seen it.
        named, unnamed = report(asked, "1.14"), report(asked, "")
        assert named == unnamed == report(mirrored, "1.14")
        assert (named.shadow_version, named.processes, named.compared) == ("1.14", 2, report(mirrored, "1.14").compared)
        with pytest.raises(grpc.RpcError) as never:
            report(asked, "1.13")
        assert never.value.code() == grpc.StatusCode.NOT_FOUND
        assert "1.13 has never been a shadow" in str(never.value.details())


def test_a_feature_shift_split_over_three_replicas_each_below_the_minimum_is_seen_on_the_merged_histograms(
    etcd: EtcdServer,
) -> None:
    minimum, url = 300, etcd.url()
    with ExitStack() as stack:
        members = start_members(stack, url, 3, *FAST)
        set_traffic(members[0], 0)
        revision = guardrails(members[0], f"feature_drift[any] > 0.2 psi for 10m min {minimum}")
        assert wait_until(lambda: all(m.served_revision() >= revision for m in members))
        wait_until(lambda: False, timeout=1)  # a few ticks: every process counts histograms for the endpoint
        # Only one process sees enough of stable to place the bins; it stores them, and the others adopt them.
        rng = np.random.default_rng(5)
        for k in range(25):
            warm = tensor("features", rng.normal(size=(50, 32)).astype(np.float32))
            assert members[0].predict_stub.Predict(predict_request(inputs=[warm], routing_key=f"w{k}"), timeout=10)
        store = open_store(url)
        stack.callback(store.close)
        assert wait_until(lambda: store.get_record("drift-bins", "ctr-ranker@1.12") is not None, timeout=30)
        wait_until(lambda: False, timeout=2)  # every process's next ticks adopt them

        set_traffic(members[1], 50)
        revision = int(members[1].routes().revision)
        assert wait_until(lambda: all(m.served_revision() >= revision for m in members))
        table = EndpointRoutes(
            "ctr-ranker", ("1.12", "1.13", "1.14"), {"1.12": 50, "1.13": 50}, {"stable": "1.12", "canary": "1.13"}
        )
        served = {(i, arm): 0 for i in range(3) for arm in ("stable", "canary")}
        key = 0
        while min(served.values()) < 120:  # 120 rows per arm per process: 360 in all, each process alone < 300
            key += 1
            i, arm = key % 3, table.choose(f"user-{key}").arm
            if served[(i, arm)] >= 120:
                continue
            rows = rng.normal(size=(10, 32)).astype(np.float32)
            if arm == "canary":
                rows[:, 3] *= 100  # an upstream unit change, only on the canary's inputs
            response = members[i].predict_stub.Predict(
                predict_request(inputs=[tensor("features", rows)], routing_key=f"user-{key}"), timeout=10
            )
            assert response.arm == arm
            served[(i, arm)] += 10
        assert wait_until(lambda: all(canary_share(m) == 0 for m in members), timeout=60)
        (incident,) = incidents(members[2]).incidents
        (verdict,) = [v for v in json.loads(incident.record)["verdicts"] if v["status"] == "breach"]
        assert verdict["metric"] == "feature_drift" and verdict["detail"] == "feature features[3]"
        assert min(verdict["samples"].values()) >= minimum > max(served.values())  # only the merged rows are enough
        assert len(guardian_rollbacks(members[0])) == 1
