"""Hostile input through real channels: every refusal is a clear status, never INTERNAL, never unbounded.

Each test reproduces one finding of the hardening review (issue 11) and failed before its fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gateway.limits import MAX_ID_CHARS, MAX_REASON_CHARS
from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
from testkit.gateways import (
    RunningGateway,
    config_text,
    own_models,
    predict_request,
    rpc_error,
    running_gateway,
)


@pytest.fixture(scope="module")
def hostile() -> Iterator[RunningGateway]:
    with running_gateway() as running:
        yield running


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(model_root=own_models(tmp_path)) as running:
        yield running


# --- 1. caller-chosen strings are bounded ------------------------------------------------------


def test_long_request_ids_are_refused_and_not_remembered(hostile: RunningGateway) -> None:
    joined_before = len(hostile.gateway.feedback._served)
    for i in range(20):
        request_id = f"{i:04d}" + "x" * (256 * 1024)
        err = rpc_error(lambda request_id=request_id: hostile.predict(request_id=request_id))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in err.details() and str(MAX_ID_CHARS) in err.details()
        assert len(err.details()) < 1024
    assert len(hostile.gateway.feedback._served) == joined_before
    # At the limit it is accepted and echoed.
    at_limit = "r" * MAX_ID_CHARS
    assert hostile.predict(request_id=at_limit).request_id == at_limit


@pytest.mark.parametrize("field", ["routing_key", "model", "output_names"])
def test_every_echoed_predict_string_is_bounded(hostile: RunningGateway, field: str) -> None:
    huge = "k" * 100_000
    kwargs: dict[str, object] = {"routing_key": huge} if field == "routing_key" else {}
    model = huge if field == "model" else "ctr-ranker"
    if field == "output_names":
        kwargs["output_names"] = (huge,)
    err = rpc_error(lambda: hostile.predict(model, **kwargs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert field in err.details()
    assert len(err.details()) < 1024


def test_feedback_ids_are_bounded(hostile: RunningGateway) -> None:
    err = rpc_error(
        lambda: hostile.predict_stub.Feedback(gw.FeedbackRequest(request_id="f" * 100_000, outcome=1), timeout=10)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.details()


def test_open_inference_strings_are_bounded(hostile: RunningGateway) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(hostile.channel)
    x = np.zeros((1, 32), dtype=np.float32)
    request = oip.ModelInferRequest(
        model_name="ctr-ranker",
        id="i" * 100_000,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[1, 32])],
        raw_input_contents=[x.tobytes()],
    )
    err = rpc_error(lambda: stub.ModelInfer(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "id" in err.details()
    metadata = rpc_error(lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name="m" * 100_000), timeout=10))
    assert metadata.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert len(metadata.details()) < 1024


def test_reasons_are_bounded(hostile: RunningGateway) -> None:
    err = rpc_error(
        lambda: hostile.admin(
            "Rollback", pb.RollbackRequest(endpoint="ctr-ranker", reason="r" * (3 << 20), dry_run=True)
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in err.details() and str(MAX_REASON_CHARS) in err.details()


# --- 4. client mistakes are not INTERNAL -------------------------------------------------------


def test_zero_size_tensor_with_huge_dims_is_invalid(hostile: RunningGateway) -> None:
    bad = gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[2**63 - 1, 0], data=b"")
    err = rpc_error(lambda: hostile.predict_stub.Predict(predict_request(inputs=[bad]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    stub = oip_grpc.GRPCInferenceServiceStub(hostile.channel)
    request = oip.ModelInferRequest(
        model_name="ctr-ranker",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=[2**63 - 1, 0])],
    )
    err = rpc_error(lambda: stub.ModelInfer(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def test_load_path_with_a_nul_byte_is_invalid(hostile: RunningGateway) -> None:
    request = pb.LoadVersionRequest(
        endpoint="ctr-ranker", version="9.9", path="ctr-ranker/1.12/model\x00.onnx", sha256="0" * 64, reason="x"
    )
    err = rpc_error(lambda: hostile.admin("LoadVersion", request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "path" in err.details()


def test_deeply_nested_apply_document_is_invalid(hostile: RunningGateway) -> None:
    document = "endpoints: " + "[" * 5000 + "]" * 5000
    err = rpc_error(lambda: hostile.admin("Apply", pb.ApplyRequest(document=document, reason="x", dry_run=True)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "nest" in err.details()


def test_huge_revision_numbers_are_not_found(hostile: RunningGateway) -> None:
    err = rpc_error(lambda: hostile.admin("GetRoutes", pb.GetRoutesRequest(revision=2**63)))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    err = rpc_error(lambda: hostile.admin("GetRoutes", pb.GetRoutesRequest(revision=2**64 - 1)))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    rollback = pb.RollbackRequest(endpoint="ctr-ranker", to_revision=2**63, reason="x", dry_run=True)
    err = rpc_error(lambda: hostile.admin("Rollback", rollback))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


# --- 5. typed contents that do not fit are refused ----------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [
        ("INT8", "int_contents", 300),
        ("INT8", "int_contents", -129),
        ("INT16", "int_contents", 40000),
        ("UINT8", "uint_contents", 256),
        ("UINT16", "uint_contents", 70000),
    ],
)
def test_out_of_range_typed_contents_are_refused(datatype: str, field: str, value: int) -> None:
    from gateway.errors import InvalidInput
    from gateway.tensors import DataType, array_from_values

    contents: Any = oip.InferTensorContents(**{field: [value]})  # type: ignore[arg-type]
    values = getattr(contents, field)  # as the converter sees them
    with pytest.raises(InvalidInput, match="do not fit"):
        array_from_values(values, DataType(datatype), [1], what="input 'x'")


def test_out_of_range_int8_contents_through_model_infer(hostile: RunningGateway) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(hostile.channel)
    request = oip.ModelInferRequest(
        model_name="ctr-ranker",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="features", datatype="INT8", shape=[1, 1], contents=oip.InferTensorContents(int_contents=[300])
            )
        ],
    )
    err = rpc_error(lambda: stub.ModelInfer(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "300" in err.details() and "INT8" in err.details()


# --- 6. loose validation ------------------------------------------------------------------------


def test_boolean_weights_are_refused(hostile: RunningGateway) -> None:
    document = config_text(traffic='{"1.12": true, "1.13": 99}')
    err = rpc_error(lambda: hostile.admin("Apply", pb.ApplyRequest(document=document, reason="x", dry_run=True)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "traffic" in err.details()


@pytest.mark.parametrize("text", ["true", "1.5", ".nan"])
def test_non_integer_endpoint_numbers_are_refused(hostile: RunningGateway, text: str) -> None:
    for field in ("max_batch_size", "intra_op_threads"):
        document = config_text(**{field: text})
        err = rpc_error(
            lambda document=document: hostile.admin(
                "Apply", pb.ApplyRequest(document=document, reason="x", dry_run=True)
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, text)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_non_finite_shadow_threshold_is_refused(hostile: RunningGateway, text: str) -> None:
    document = config_text(shadow_compare=f"{{threshold: {text}}}")
    err = rpc_error(lambda: hostile.admin("Apply", pb.ApplyRequest(document=document, reason="x", dry_run=True)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "threshold" in err.details()


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -1.0, 1e300])
def test_rollout_step_seconds_must_be_finite(hostile: RunningGateway, seconds: float) -> None:
    request = pb.StartRolloutRequest(  # a dry run: a regression cannot leave the shared gateway rolling out
        endpoint="ctr-ranker", version="1.14", step_seconds=seconds, reason="x", dry_run=True
    )
    err = rpc_error(lambda: hostile.admin("StartRollout", request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert hostile.admin("GetRoutes", pb.GetRoutesRequest()).endpoints[0].traffic == {"1.12": 90, "1.13": 10}


@pytest.mark.parametrize(("error_rate", "latency_ms"), [(float("nan"), 0.0), (0.0, float("nan")), (0.0, float("inf"))])
def test_fault_numbers_must_be_finite(hostile: RunningGateway, error_rate: float, latency_ms: float) -> None:
    request = pb.SetFaultRequest(
        endpoint="ctr-ranker", version="1.13", error_rate=error_rate, latency_ms=latency_ms, reason="x", dry_run=True
    )
    err = rpc_error(lambda: hostile.admin("SetFault", request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


# --- 7. the audit stays readable ----------------------------------------------------------------


def test_audit_pages_by_size(fresh: RunningGateway) -> None:
    reason = "r" * MAX_REASON_CHARS
    big = config_text(versions='["1.12", "1.13", "1.14"]', traffic='{"1.12": 90, "1.13": 10}')
    for _ in range(12):
        fresh.admin("Apply", pb.ApplyRequest(document=big, reason=reason, dry_run=True))
    budget = 4 * 1024
    page = fresh.admin("GetAudit", pb.GetAuditRequest(max_bytes=budget))
    assert page.entries and page.ByteSize() <= budget + 4096
    seen = [e.id for e in page.entries]
    while page.next_before_id:
        page = fresh.admin("GetAudit", pb.GetAuditRequest(max_bytes=budget, before_id=page.next_before_id))
        seen += [e.id for e in page.entries]
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) >= 13


# --- worst cases of the admin plane -------------------------------------------------------------


def test_model_loads_beyond_the_limit_are_refused_and_rollbacks_still_run(fresh: RunningGateway) -> None:
    from gateway.control import MAX_CONCURRENT_LOADS

    loads = fresh.gateway.control._loads
    for _ in range(MAX_CONCURRENT_LOADS):
        assert loads.acquire(blocking=False)  # as if two slow loads were running
    try:
        from gateway.repository import file_sha256

        digest = file_sha256(fresh.gateway.repository.root / "ctr-ranker/1.12/model.onnx")
        request = pb.LoadVersionRequest(
            endpoint="ctr-ranker", version="2.0", path="ctr-ranker/1.12/model.onnx", sha256=digest, reason="third"
        )
        err = rpc_error(lambda: fresh.admin("LoadVersion", request))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "loads are in progress" in err.details()
        rollback = fresh.admin("Rollback", pb.RollbackRequest(endpoint="ctr-ranker", reason="still possible"))
        assert rollback.revision == 2
    finally:
        for _ in range(MAX_CONCURRENT_LOADS):
            loads.release()


def test_list_pages_fit_their_byte_budget() -> None:
    from gateway.grpc.admin_converters import within

    entries = [pb.AuditEntry(id=i, reason="r" * 1000) for i in range(100)]
    kept = within(entries, 10_000)
    assert 5 <= len(kept) < 10 and kept == entries[: len(kept)]
    assert within([pb.AuditEntry(reason="r" * 50_000)], 10) != []  # the first always comes back


@pytest.mark.parametrize("outcome", [float("nan"), float("inf"), -1.0, 2.0, 1e300])
def test_feedback_outcomes_are_rates(hostile: RunningGateway, outcome: float) -> None:
    served = hostile.predict()
    err = rpc_error(
        lambda: hostile.predict_stub.Feedback(
            gw.FeedbackRequest(request_id=served.request_id, outcome=outcome), timeout=10
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "between 0 and 1" in err.details()
    joined = hostile.predict_stub.Feedback(gw.FeedbackRequest(request_id=served.request_id, outcome=1.0), timeout=10)
    assert joined.joined  # the refused outcome did not use up the request id


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, -1e13])
def test_feedback_values_are_bounded(hostile: RunningGateway, value: float) -> None:
    served = hostile.predict()
    request = gw.FeedbackRequest(request_id=served.request_id, outcome=1.0, value=value)
    err = rpc_error(lambda: hostile.predict_stub.Feedback(request, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "value" in err.details()
    ok = hostile.predict_stub.Feedback(
        gw.FeedbackRequest(request_id=served.request_id, outcome=1.0, value=-25.5), timeout=10
    )
    assert ok.joined  # refunds are values too; the refused call did not use up the id
