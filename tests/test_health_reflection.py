from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import RunningGateway

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_health_overall_and_per_endpoint(demo: RunningGateway) -> None:
    stub = health_pb2_grpc.HealthStub(demo.channel)
    for service in ("", "ctr-ranker", "gateway.v1.Inference", "inference.GRPCInferenceService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no-such-endpoint"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(demo: RunningGateway) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(demo.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"gateway.v1.Inference", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
