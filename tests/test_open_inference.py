"""inference.GRPCInferenceService (Open Inference Protocol v2) through real channels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
from testkit.gateways import MODELS, RunningGateway, features

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def stub(demo: RunningGateway) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(demo.channel)


def infer_request(
    x: np.ndarray, *, version: str = "", routing_key: str = "", raw: bool = True
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="ctr-ranker", model_version=version, id="r-1")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=x.shape)
    if raw:
        request.raw_input_contents.append(x.tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    if routing_key:
        request.parameters["routing_key"].string_param = routing_key
    return request


def output(response: oip.ModelInferResponse) -> np.ndarray:
    (meta,) = response.outputs
    assert (meta.name, meta.datatype) == ("score", "FP32")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(meta.shape)


def direct(version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS / "ctr-ranker" / version / "model.onnx"))
    result: np.ndarray = session.run(None, {"features": x})[0]
    return result


def test_liveness_readiness_and_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="ctr-ranker")).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="ctr-ranker", version="1.14")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="ctr-ranker", version="9")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nope")).ready
    server = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "model-gateway"
    assert {"model_configuration", "model_repository", "statistics"} <= set(server.extensions)
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="ctr-ranker"))
    assert (meta.name, list(meta.versions), meta.platform) == (
        "ctr-ranker",
        ["1.12", "1.13", "1.14"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("features", "FP32", [-1, 32])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("score", "FP32", [-1, 1])]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(oip.ModelMetadataRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("raw", [True, False])
def test_model_infer_raw_and_typed_contents(stub: oip_grpc.GRPCInferenceServiceStub, raw: bool) -> None:
    x = features(3, seed=11)
    response = stub.ModelInfer(infer_request(x, version="1.13", raw=raw))
    assert (response.model_name, response.model_version, response.id) == ("ctr-ranker", "1.13", "r-1")
    np.testing.assert_array_equal(output(response), direct("1.13", x))


def test_routing_key_parameter_is_sticky_like_predict(
    demo: RunningGateway, stub: oip_grpc.GRPCInferenceServiceStub
) -> None:
    versions = set()
    for i in range(150):
        key = f"user-{i}"
        oip_version = stub.ModelInfer(infer_request(features(1), routing_key=key)).model_version
        assert oip_version == demo.predict(routing_key=key).version
        versions.add(oip_version)
    assert versions == {"1.12", "1.13"}


def test_label_as_model_version(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ModelInfer(infer_request(features(1), version="canary")).model_version == "1.13"


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (
            lambda r: r.raw_input_contents.append(b"x"),
            "INVALID_ARGUMENT",
            "raw_input_contents has 2 entries for 1 inputs",
        ),
        (
            lambda r: setattr(r.inputs[0], "datatype", "FLOAT"),
            "INVALID_ARGUMENT",
            "unknown datatype 'FLOAT'; valid datatypes: BOOL",
        ),
        (lambda r: setattr(r, "model_version", "0.1"), "NOT_FOUND", "no version '0.1'"),
        (lambda r: setattr(r, "model_name", ""), "INVALID_ARGUMENT", "model_name is empty"),
        (lambda r: r.outputs.add(name="nope"), "INVALID_ARGUMENT", "has no output 'nope'"),
        (
            lambda r: r.parameters["routing_key"].MergeFrom(oip.InferParameter(bool_param=True)),
            "INVALID_ARGUMENT",
            "must be a string",
        ),
    ],
)
def test_model_infer_errors(stub: oip_grpc.GRPCInferenceServiceStub, mutate, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    request = infer_request(features(1))
    mutate(request)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == getattr(grpc.StatusCode, code)
    assert message in err.value.details()


def test_raw_input_with_an_empty_contents_is_the_raw_tensor(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    """What MLServer's NumpyRequestCodec(use_raw=True) sends: raw bytes and an empty `contents {}`."""
    x = features(2, seed=4)
    request = infer_request(x, version="1.12")
    request.inputs[0].contents.SetInParent()
    assert request.inputs[0].HasField("contents")
    np.testing.assert_array_equal(output(stub.ModelInfer(request)), direct("1.12", x))
    request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has values in both contents and raw_input_contents" in err.value.details()


def test_typed_contents_count_must_match_shape(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request(features(1), raw=False)
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 33 values, but shape [1, 32] needs 32 FP32 values" in err.value.details()


@pytest.mark.slow
def test_tritonclient_works_unchanged(demo: RunningGateway) -> None:
    """An unmodified tritonclient.grpc client, in its own process (its protos clash with ours in one pool)."""
    completed = subprocess.run(
        [sys.executable, str(HERE / "tritonclient_probe.py"), demo.target],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "32"]}]
    x = np.asarray(report["features"], dtype=np.float32)
    for version, result in report["results"].items():
        np.testing.assert_array_equal(np.asarray(result, dtype=np.float32), direct(version, x))
    assert report["results"].keys() == {"1.12", "1.13", "1.14"}
    assert report["sticky_version"] in {"1.12", "1.13"}
    assert report["sticky_version"] == demo.predict(routing_key="user-7").version
