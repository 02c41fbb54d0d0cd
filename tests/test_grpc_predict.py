"""gateway.v1.Inference/Predict through a real channel to a real server on port 0."""

from __future__ import annotations

from collections import Counter

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gateway.pb.gateway.v1 import inference_pb2 as gw
from testkit.gateways import MODELS, RunningGateway, config_text, features, running_gateway, scores, tensor


def direct(version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS / "ctr-ranker" / version / "model.onnx"))
    result: np.ndarray = session.run(None, {"features": x})[0]
    return result


def test_predict_returns_version_arm_and_onnxruntime_numbers(demo: RunningGateway) -> None:
    x = features(4, seed=7)
    response = demo.predict(inputs=[tensor("features", x)], routing_key="user-42")
    assert response.model == "ctr-ranker"
    assert (response.version, response.arm) in {("1.12", "stable"), ("1.13", "canary")}
    assert response.route_revision == 1
    assert len(response.request_id) == 32
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("score", gw.DATA_TYPE_FP32, [4, 1])
    np.testing.assert_array_equal(scores(response), direct(response.version, x))


def test_weights_split_traffic_and_keys_are_sticky(demo: RunningGateway) -> None:
    served = {}
    for i in range(600):
        response = demo.predict(routing_key=f"user-{i}")
        served[f"user-{i}"] = (response.version, response.arm)
    counts = Counter(v for v, _ in served.values())
    assert 20 <= counts["1.13"] <= 110, counts  # 10% of 600, +-5 sigma
    assert counts["1.12"] + counts["1.13"] == 600
    for key in list(served)[:100]:
        response = demo.predict(routing_key=key)
        assert (response.version, response.arm) == served[key]


def test_pin_and_label(demo: RunningGateway) -> None:
    x = features(2, seed=3)
    pinned = demo.predict("ctr-ranker@1.14", inputs=[tensor("features", x)])
    assert (pinned.version, pinned.arm) == ("1.14", "pinned")
    np.testing.assert_array_equal(scores(pinned), direct("1.14", x))
    labelled = demo.predict("ctr-ranker:canary")
    assert (labelled.version, labelled.arm) == ("1.13", "pinned")


def test_request_id_is_echoed(demo: RunningGateway) -> None:
    assert demo.predict(request_id="req-1").request_id == "req-1"
    assert demo.predict().request_id != demo.predict().request_id


def test_output_names(demo: RunningGateway) -> None:
    assert [o.name for o in demo.predict(output_names=("score",)).outputs] == ["score"]
    with pytest.raises(grpc.RpcError) as err:
        demo.predict(output_names=("logits",))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no output 'logits'; outputs: score" in err.value.details()


def _error(demo: RunningGateway, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        demo.predict(**kwargs)
    return err.value


ROW = features(1)


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        ({"model": "nope"}, "NOT_FOUND", "no endpoint 'nope'; served endpoints: ctr-ranker"),
        ({"model": "ctr-ranker@2.0"}, "NOT_FOUND", "no version '2.0'; versions: 1.12, 1.13, 1.14"),
        (
            {"model": "ctr-ranker:beta"},
            "NOT_FOUND",
            "no label 'beta'; labels: canary -> 1.13, stable -> 1.12",
        ),
        ({"model": ""}, "INVALID_ARGUMENT", "model is empty"),
        (
            {"inputs": []},
            "INVALID_ARGUMENT",
            "missing input 'features'; expected inputs: features (FP32 [-1, 32])",
        ),
        (
            {"inputs": [tensor("feats", ROW)]},
            "INVALID_ARGUMENT",
            "missing input 'features'; unexpected input 'feats'",
        ),
        (
            {"inputs": [tensor("features", ROW.astype(np.float64), gw.DATA_TYPE_FP64)]},
            "INVALID_ARGUMENT",
            "input 'features' has datatype FP64; expected FP32 (shape [-1, 32])",
        ),
        (
            {"inputs": [tensor("features", features(1)[:, :16])]},
            "INVALID_ARGUMENT",
            "input 'features' has shape [1, 16]; expected [-1, 32]",
        ),
        (
            {"inputs": [tensor("features", ROW.reshape(32))]},
            "INVALID_ARGUMENT",
            "input 'features' has shape [32]; expected [-1, 32]",
        ),
        (
            {"inputs": [gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[1, 32], data=b"\0" * 100)]},
            "INVALID_ARGUMENT",
            "input 'features' has 100 bytes of data, but shape [1, 32] of FP32 needs 128 bytes",
        ),
        (
            {"inputs": [gw.Tensor(name="features", shape=[1, 32], data=ROW.tobytes())]},
            "INVALID_ARGUMENT",
            "input 'features' has datatype 0; valid datatypes: DATA_TYPE_BOOL",
        ),
        (
            {"inputs": [gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[-1, 32], data=b"")]},
            "INVALID_ARGUMENT",
            "dimensions must be >= 0",
        ),
        (
            {"inputs": [tensor("features", ROW), tensor("features", ROW)]},
            "INVALID_ARGUMENT",
            "input 'features' is given twice",
        ),
        (
            {"rows": 257},
            "RESOURCE_EXHAUSTED",
            "batch size 257 of input 'features' exceeds the endpoint's max_batch_size 256",
        ),
    ],
)
def test_bad_requests_get_clear_statuses(
    demo: RunningGateway, kwargs: dict[str, object], code: str, message: str
) -> None:
    err = _error(demo, **kwargs)
    assert err.code() == getattr(grpc.StatusCode, code), err.details()
    assert message in err.details()
    # The server keeps serving after every refusal.
    assert demo.predict().version in {"1.12", "1.13"}


def test_oversized_message_is_resource_exhausted() -> None:
    with running_gateway(max_message_bytes=64 * 1024) as small:
        err = _error(small, rows=1024)  # 128 KiB of features
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.details()
        assert small.predict().outputs


def test_nan_inputs_pass_by_default_and_reject_when_configured(demo: RunningGateway) -> None:
    x = features(2)
    x[1, 5] = np.nan
    response = demo.predict("ctr-ranker@1.12", inputs=[tensor("features", x)])
    assert list(scores(response).shape) == [2, 1]
    with running_gateway(config_text(nan_policy="reject")) as strict:
        err = _error(strict, inputs=[tensor("features", x)])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'features' has NaN at index [1, 5]; this endpoint's nan_policy is 'reject'" in err.details()


def test_unexpected_error_is_internal_without_details(
    demo: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = demo.gateway.registry.runnable("ctr-ranker", "1.14")

    def broken(*args: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(model, "_run", broken)
    err = _error(demo, model="ctr-ranker@1.14")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.details()
    assert "internal error; quote error id" in err.details()
    error_id = err.details().split("error id ")[1].split()[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert demo.predict("ctr-ranker@1.14").version == "1.14"
