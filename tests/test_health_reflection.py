"""grpc.health.v1 and server reflection (v1 and v1alpha) on both listeners, through real channels."""

from __future__ import annotations

import asyncio
import queue
import threading
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2

from gateway.pb.grpc.health.v1 import health_pb2, health_pb2_grpc
from gateway.pb.grpc.reflection.v1 import reflection_pb2 as v1
from gateway.pb.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc
from gateway.pb.grpc.reflection.v1alpha import reflection_pb2 as v1alpha
from gateway.pb.grpc.reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc
from testkit.gateways import RunningGateway, bearer, running_gateway

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFLECTION = {"v1": (v1, v1_grpc), "v1alpha": (v1alpha, v1alpha_grpc)}


def test_health_overall_and_per_endpoint(demo: RunningGateway) -> None:
    stub = health_pb2_grpc.HealthStub(demo.channel)
    for service in ("", "ctr-ranker", "gateway.v1.Inference", "inference.GRPCInferenceService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no-such-endpoint"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = stub.List(health_pb2.HealthListRequest()).statuses
    assert listed["ctr-ranker"].status == SERVING and listed[""].status == SERVING


def test_health_watch_sees_shutdown() -> None:
    seen: queue.Queue[int] = queue.Queue()
    with running_gateway() as gw:
        stream = health_pb2_grpc.HealthStub(gw.channel).Watch(health_pb2.HealthCheckRequest(service="ctr-ranker"))

        def follow() -> None:
            try:
                for response in stream:
                    seen.put(response.status)
            except grpc.RpcError:
                pass

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        assert seen.get(timeout=10) == SERVING
        gw.loop.run(gw.server.health.shut_down())
        assert seen.get(timeout=10) == NOT_SERVING
        stream.cancel()
        thread.join(10)


SERVICES = ("", "ctr-ranker", "gateway.v1.Inference", "inference.GRPCInferenceService")


class Watch:
    """A Health.Watch stream: the server pushes each change of status (the first is the current one)."""

    def __init__(self, stub: health_pb2_grpc.HealthStub, service: str) -> None:
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)

    def next(self) -> int:
        status: int = next(self.call).status
        return status

    def cancel(self) -> None:
        self.call.cancel()


def test_an_endpoint_whose_weighted_versions_are_not_ready_is_not_serving() -> None:
    """A version that drops out of the registry (as a failed reload would leave it) takes the endpoint,
    and the server overall, to NOT_SERVING; loading it again brings both back."""
    with running_gateway() as gw:
        stub = health_pb2_grpc.HealthStub(gw.channel)
        endpoint, overall = Watch(stub, "ctr-ranker"), Watch(stub, "")
        assert (endpoint.next(), overall.next()) == (SERVING, SERVING)
        registry = gw.gateway.registry
        artifact = gw.gateway.control.state.endpoint("ctr-ranker").artifacts["1.12"]
        registry.unload("ctr-ranker", "1.12")  # stable, 90% of the traffic
        assert (endpoint.next(), overall.next()) == (NOT_SERVING, NOT_SERVING)
        assert stub.Check(health_pb2.HealthCheckRequest(service="gateway.v1.Inference")).status == NOT_SERVING
        registry.load(artifact)
        assert (endpoint.next(), overall.next()) == (SERVING, SERVING)
        endpoint.cancel()
        overall.cancel()


def test_stopping_the_listener_reports_not_serving_everywhere_while_calls_drain() -> None:
    with running_gateway() as gw:
        stub = health_pb2_grpc.HealthStub(gw.channel)
        watches = {service: Watch(stub, service) for service in SERVICES}
        assert {service: watch.next() for service, watch in watches.items()} == dict.fromkeys(SERVICES, SERVING)
        stopping = asyncio.run_coroutine_threadsafe(gw.server.stop(grace=30), gw.loop.loop)
        assert {service: watch.next() for service, watch in watches.items()} == dict.fromkeys(SERVICES, NOT_SERVING)
        assert not stopping.done()  # still draining: the open watches are calls in flight
        for watch in watches.values():
            watch.cancel()
        stopping.result(30)


def _ask(
    channel: grpc.Channel, version: str, metadata: tuple[tuple[str, str], ...] = (), **question: object
) -> list[object]:
    pb, pb_grpc = REFLECTION[version]
    stub = pb_grpc.ServerReflectionStub(channel)
    requests = iter([pb.ServerReflectionRequest(**question)])
    return list(stub.ServerReflectionInfo(requests, metadata=metadata, timeout=10))


def _services(channel: grpc.Channel, version: str, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    (response,) = _ask(channel, version, metadata, list_services="")
    return {s.name for s in response.list_services_response.service}  # type: ignore[attr-defined]


def _symbols(response: object, pb: ModuleType) -> set[str]:
    names: set[str] = set()
    for blob in response.file_descriptor_response.file_descriptor_proto:  # type: ignore[attr-defined]
        file = descriptor_pb2.FileDescriptorProto.FromString(blob)
        names.update(f"{file.package}.{m.name}" for m in file.message_type)
        names.update(f"{file.package}.{s.name}" for s in file.service)
    return names


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_on_the_inference_listener(demo: RunningGateway, version: str) -> None:
    assert {
        "gateway.v1.Inference",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= _services(demo.channel, version)
    (response,) = _ask(demo.channel, version, file_containing_symbol="inference.GRPCInferenceService")
    assert {"inference.GRPCInferenceService", "inference.ModelInferRequest"} <= _symbols(
        response, REFLECTION[version][0]
    )
    # Every listed service can be described (what `grpcurl describe` does for each).
    for name in _services(demo.channel, version):
        (response,) = _ask(demo.channel, version, file_containing_symbol=name)
        assert name in _symbols(response, REFLECTION[version][0]), name
    (missing,) = _ask(demo.channel, version, file_containing_symbol="no.such.Service")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_on_the_admin_listener(demo: RunningGateway, version: str) -> None:
    with pytest.raises(grpc.RpcError) as err:  # the admin API is shown to token holders only
        _services(demo.admin_channel, version)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    services = _services(demo.admin_channel, version, bearer())
    assert {"gateway.v1.Admin", "grpc.reflection.v1.ServerReflection"} <= services
    (response,) = _ask(demo.admin_channel, version, bearer(), file_containing_symbol="gateway.v1.Admin")
    assert "gateway.v1.Admin" in _symbols(response, REFLECTION[version][0])
