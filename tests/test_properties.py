"""Property-based tests of every RPC through a real channel: generated requests never get INTERNAL.

For every RPC of `gateway.v1.Inference`, `inference.GRPCInferenceService` and
`gateway.v1.Admin`, hypothesis builds requests from the message descriptors: any field
may be empty, huge, NUL-laden, out of range, NaN or infinite, or one of the names the
gateway knows (so requests also get past the first checks). Each must get a valid answer or
a status other than INTERNAL/UNKNOWN, and the gateway must keep serving afterwards.
Derandomized and bounded (a few hundred requests in all), so the suite stays fast and stable.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.grpc.server import ADMIN, INFERENCE, OPEN_INFERENCE
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
from testkit.gateways import MODELS, RunningGateway, bearer, config_text, predict_request, running_gateway

KNOWN_TEXT = [
    "", "ctr-ranker", "ctr-ranker@1.13", "ctr-ranker:canary", "1.12", "1.13", "1.14", "stable", "canary",
    "features", "score", "FP32", "INT8", "BYTES", "ctr-ranker/1.12/model.onnx", "ctr-ranker/1.14",
    "error_rate > 2% for 5m min 500", "latency_p95_ratio > 1.3 for 10m", "drill", "user-1", "9.9",
    "../../etc/passwd", "a\x00b", "routing_key", "trace_id", config_text(), "x" * 300_000, "é✓" * 50,
]  # fmt: skip
ROW = np.full((1, 32), 0.1, dtype=np.float32).tobytes()
COUNTS: Counter[str] = Counter()

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, -1, 0, 1, 2, 32, 100, 101, 256, 2**31, 2**63) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -3), min(high, 200)))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(KNOWN_TEXT), st.text(max_size=40))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(BYTES), st.binary(max_size=200))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        special = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 100.0, 60_000.0, math.nan, math.inf, -math.inf, 1e300])
        floats = st.floats(width=32) if kind == FieldDescriptor.TYPE_FLOAT else st.floats()
        return st.one_of(special, floats)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-3, 40))
    return _integers(*_INTS[kind])


#: Shapes that reached INTERNAL once (zero-size with huge dimensions), and near misses of the real one.
SHAPES = [[2**63 - 1, 0], [2**31, 2**31, 2**31, 0], [0, 32], [1, 32], [2, 32], [1, 31], [32], [], [1, 1]]
BYTES = [b"", ROW, ROW * 2, b"\x00" * 100_000]


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def _repeated(field: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
    generic = st.lists(_value(field, depth), max_size=4)
    if field.name == "shape":
        return st.one_of(st.sampled_from(SHAPES), generic)
    if field.name == "raw_input_contents":
        return st.one_of(st.lists(st.sampled_from(BYTES), max_size=2), generic)
    return generic


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` with any subset of their fields set to generated values."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(_scalar(key), _value(value, depth), max_size=4)
        elif field.is_repeated:
            fields[field.name] = _repeated(field, depth)
        else:
            fields[field.name] = _value(field, depth)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = cls()
        for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []:
            _assign(message, descriptor.fields_by_name[name], draw(fields[name]))
        return message

    return build()


def _assign(message: Any, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if isinstance(value, dict):
        assert field.message_type is not None
        for k, v in value.items():
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif isinstance(value, list):
        for item in value:
            target.add().CopyFrom(item) if field.type == FieldDescriptor.TYPE_MESSAGE else target.append(item)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _valid_infer() -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name="ctr-ranker",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[1, 32])],
        raw_input_contents=[ROW],
    )


def _nearly_valid(method: MethodDescriptor) -> st.SearchStrategy[Any] | None:
    """Valid requests with one generated field changed, so the deeper checks are reached too."""
    base: Any
    if method.name == "Predict":
        base = predict_request()
    elif method.name in ("ModelInfer", "ModelStreamInfer"):
        base = _valid_infer()
    else:
        return None
    descriptor = method.input_type
    tensor = descriptor.fields_by_name["inputs"].message_type
    assert tensor is not None

    @st.composite
    def mutate(draw: st.DrawFn) -> Any:
        message = type(base)()
        message.CopyFrom(base)
        noise = draw(messages(descriptor))
        for field, _ in noise.ListFields():
            message.ClearField(field.name)
        message.MergeFrom(noise)
        return message

    @st.composite
    def hostile_tensor(draw: st.DrawFn) -> Any:
        """The valid request with its one tensor's shape and data drawn from the hostile lists."""
        message = type(base)()
        message.CopyFrom(base)
        noise = draw(messages(tensor))
        first = message.inputs[0]
        for field, _ in noise.ListFields():
            first.ClearField(field.name)
        first.MergeFrom(noise)
        del first.shape[:]
        first.shape.extend(draw(st.sampled_from(SHAPES)))
        data = draw(st.sampled_from(BYTES))
        if method.name == "Predict":
            first.data = data
        else:
            message.raw_input_contents[0] = data
        return message

    return st.one_of(mutate(), hostile_tensor())


RPCS = [
    (service.name, method)
    for service in (INFERENCE, OPEN_INFERENCE, ADMIN)
    for method in service.methods
]  # fmt: skip


@pytest.fixture(scope="module")
def target() -> Iterator[RunningGateway]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        shutil.copytree(MODELS / "ctr-ranker", root / "ctr-ranker")
        with running_gateway(model_root=root, settings={"default_deadline": 5.0}) as running:
            yield running
    ran = sum(COUNTS.values())
    print(f"\nproperty tests: {ran} generated requests over {len(COUNTS)} RPCs; none answered INTERNAL or UNKNOWN")


def _stub(gw: RunningGateway, service: str) -> Any:
    if service == "Admin":
        return admin_pb2_grpc.AdminStub(gw.admin_channel)
    if service == "Inference":
        return gw_grpc.InferenceStub(gw.channel)
    return oip_grpc.GRPCInferenceServiceStub(gw.channel)


def _keeps_serving(gw: RunningGateway) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(gw.channel)
    assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
    try:
        gw.predict("ctr-ranker@1.12")
    except grpc.RpcError as err:  # a generated fault or unload may refuse it, but never as a crash
        assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err.details()


def _stream(call: Any, request: Any, metadata: Any) -> None:
    """The generated message then a valid one on one ModelStreamInfer stream: both answered, neither INTERNAL/UNKNOWN."""
    replies = list(call(iter([request, _valid_infer()]), metadata=metadata, timeout=20))
    assert len(replies) == 2, f"a stream of 2 messages got {len(replies)} answers: {replies}"
    for reply in replies:
        error = reply.error_message  # in band, "CODE: message"
        assert not error.startswith(("INTERNAL", "UNKNOWN")), f"{error}\nrequest: {str(request)[:2000]}"


@pytest.mark.parametrize(("service", "method"), RPCS, ids=[f"{s}.{m.name}" for s, m in RPCS])
def test_generated_requests_never_get_internal(target: RunningGateway, service: str, method: MethodDescriptor) -> None:
    stub = _stub(target, service)
    call = getattr(stub, method.name)
    strategy = messages(method.input_type)
    nearly = _nearly_valid(method)
    if nearly is not None:
        strategy = st.one_of(strategy, nearly)
    budget = 120 if nearly is not None else 15

    @settings(
        max_examples=budget,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=strategy, authenticated=st.booleans() if service == "Admin" else st.just(False))
    def check(request: Any, authenticated: bool) -> None:
        COUNTS[method.full_name] += 1
        metadata = bearer() if service != "Admin" or authenticated or COUNTS[method.full_name] % 5 else ()
        try:
            if method.client_streaming:
                _stream(call, request, metadata)
            else:
                call(request, metadata=metadata, timeout=20)
        except grpc.RpcError as err:
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                f"{method.full_name}: {err.code().name}: {err.details()}\nrequest: {str(request)[:2000]}"
            )
            assert len(err.details() or "") <= 1000

    check()
    _keeps_serving(target)
