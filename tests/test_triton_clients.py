"""Triton's own clients against the gateway: the calls of its simple_grpc_* examples, in order.

tests/triton_examples_probe.py makes the calls with tritonclient in its own process; the
gateway serves Triton's `simple` model (tests/simple_model.py) beside a ctr-ranker version.
The Open Inference Protocol extensions (config, statistics, streaming, repository) are also
checked here with the gateway's own stubs, where tritonclient cannot look.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
from testkit.gateways import CI_TOKEN, MODELS, ONCALL_TOKEN, RunningGateway, bearer, features, running_gateway
from tests.simple_model import write_simple

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton-models")
    write_simple(root, "simple", "1")
    write_simple(root, "simple", "2")  # on disk, not loaded: RepositoryModelLoad loads it
    shutil.copytree(MODELS / "ctr-ranker" / "1.12", root / "ctr-ranker" / "1.12")
    return root


ROUTES = """
model_root: {root}
endpoints:
  simple:
    versions: ["1"]
    traffic: {{"1": 100}}
    labels: {{stable: "1"}}
    max_batch_size: 8
  ctr-ranker:
    versions: ["1.12"]
    traffic: {{"1.12": 100}}
    labels: {{stable: "1.12"}}
"""


@pytest.fixture(scope="module")
def triton(model_root: Path) -> Iterator[RunningGateway]:
    # Named `triton`, as Triton's health/metadata example checks (gateway serve --server-name triton).
    with running_gateway(ROUTES.format(root=model_root), model_root=model_root, server_name="triton") as gw:
        yield gw


def probe(gw: RunningGateway, scenario: str, *args: str) -> Any:
    completed = subprocess.run(
        [sys.executable, str(HERE / "triton_examples_probe.py"), gw.target, scenario, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["infer", "custom_args", "keepalive"])
def test_infer_examples(triton: RunningGateway, scenario: str) -> None:
    seen = probe(triton, scenario)
    assert seen["with_outputs"] and seen["without_outputs"]
    (stats,) = seen["statistics"]["model_stats"]  # one version, as Triton's example expects
    assert (stats["name"], stats["version"]) == ("simple", "1")
    success = stats["inference_stats"]["success"]
    assert int(success["count"]) >= 1 and int(success["ns"]) > 0
    assert int(stats["execution_count"]) >= 1 and int(stats["inference_count"]) >= 1
    assert int(stats["last_inference"]) > 0


@pytest.mark.slow
def test_aio_and_async_examples(triton: RunningGateway) -> None:
    seen = probe(triton, "aio")
    assert seen == {"first": True, "model_stats": 1, "gathered": [True, True]}
    assert probe(triton, "async_infer") == {"ok": True}


@pytest.mark.slow
def test_health_metadata_example(triton: RunningGateway) -> None:
    seen = probe(triton, "health_metadata")
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["server_name"] == "triton"
    assert seen["model_name"] == "simple"
    assert seen["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'wrong_model_name' is not found" in seen["unknown_model"]["message"]
    config = seen["config"]
    assert (config["name"], config["platform"], config["backend"]) == ("simple", "onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == 8
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_INT32", ["16"]),
        ("INPUT1", "TYPE_INT32", ["16"]),
    ]
    assert [o["name"] for o in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    assert config["version_policy"] == {"specific": {"versions": ["1"]}}
    assert config["parameters"]["traffic"] == {"string_value": "1=100"}


@pytest.mark.slow
def test_model_control_example_needs_the_admin_token(triton: RunningGateway) -> None:
    refused = probe(triton, "model_control")
    assert refused["load"]["status"] == "StatusCode.UNAUTHENTICATED"
    assert "Bearer" in refused["load"]["message"]
    seen = probe(triton, "model_control", ONCALL_TOKEN)
    assert {(m["name"], m["version"], m["state"]) for m in seen["index"]} == {
        ("simple", "1", "READY"),
        ("ctr-ranker", "1.12", "READY"),
    }
    assert seen["load"]["status"] == "OK" and seen["ready_after_load"]  # loaded already: nothing to do
    for refusal in ("load_bad_config", "load_config", "load_files"):
        assert seen[refusal]["status"] == "StatusCode.INVALID_ARGUMENT", refusal
        assert "failed to load 'simple'" in seen[refusal]["message"]
    assert seen["max_batch_size"] == 8  # configs are the route file's, not the protocol's
    assert seen["unload"]["status"] == "StatusCode.INVALID_ARGUMENT"  # an endpoint is never unloaded whole
    assert "name the version" in seen["unload"]["message"] and seen["ready_after_unload"]
    assert seen["live"]
    assert seen["load_unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert "failed to load 'wrong_model_name'" in seen["load_unknown"]["message"]


@pytest.mark.slow
def test_stream_answers_in_order_and_survives_a_bad_request(triton: RunningGateway) -> None:
    replies = probe(triton, "stream")["replies"]
    assert [r.get("id") for r in replies] == ["r0", "r1", "r2", None, "r3", "r4"]
    assert all(r["ok"] for r in replies if "id" in r)
    assert "Request for unknown model" not in replies[3]["error"]  # routed, not a metadata call
    assert replies[3]["error"].startswith("NOT_FOUND: no endpoint 'wrong_model_name'")


# --- the same extensions through the gateway's own stubs -------------------------------------


@pytest.fixture
def stub(triton: RunningGateway) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(triton.channel)


def _simple_request(model: str = "simple", request_id: str = "") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[2, 16])
        request.raw_input_contents.append(np.arange(32, dtype="<i4").tobytes())
    return request


def test_stream_errors_are_in_band(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    bad = _simple_request(request_id="bad")
    bad.inputs[0].datatype = "FP32"
    replies = list(stub.ModelStreamInfer(iter([_simple_request(request_id="a"), bad, _simple_request(request_id="b")])))
    assert [r.infer_response.id for r in replies] == ["a", "bad", "b"]
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    assert replies[1].error_message.startswith("INVALID_ARGUMENT: simple 1: input 'INPUT0' has datatype FP32")
    out = np.frombuffer(replies[2].infer_response.raw_output_contents[0], dtype="<i4")
    np.testing.assert_array_equal(out, 2 * np.arange(32))


def test_model_config_of_a_float_endpoint_with_named_versions(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    config = stub.ModelConfig(oip.ModelConfigRequest(name="ctr-ranker")).config
    assert (config.max_batch_size, [list(i.dims) for i in config.input]) == (256, [[32]])
    assert config.version_policy.WhichOneof("policy_choice") == "all"  # "1.12" is no integer
    assert config.parameters["versions"].string_value == "1.12"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelConfig(oip.ModelConfigRequest(name="simple", version="7"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "versions: 1" in err.value.details()


def test_statistics_count_successes_and_failures_per_version(
    triton: RunningGateway, stub: oip_grpc.GRPCInferenceServiceStub
) -> None:
    def stats() -> oip.ModelStatistics:
        (one,) = stub.ModelStatistics(oip.ModelStatisticsRequest(name="ctr-ranker", version="1.12")).model_stats
        statistics: oip.ModelStatistics = one
        return statistics

    before = stats()
    request = oip.ModelInferRequest(model_name="ctr-ranker")
    request.inputs.add(name="features", datatype="FP32", shape=[3, 32])
    request.raw_input_contents.append(features(3).tobytes())
    stub.ModelInfer(request)
    request.inputs[0].shape[:] = [1, 96]
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(request)
    after = stats()
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1  # one model run
    assert after.inference_stats.compute_infer.count == before.inference_stats.compute_infer.count + 1
    compute = after.inference_stats.compute_infer.ns - before.inference_stats.compute_infer.ns
    assert 0 < compute < after.inference_stats.success.ns - before.inference_stats.success.ns
    everything = stub.ModelStatistics(oip.ModelStatisticsRequest()).model_stats
    assert {(s.name, s.version) for s in everything} >= {("simple", "1"), ("ctr-ranker", "1.12")}


def test_repository_load_and_unload_are_audited_admin_operations(
    triton: RunningGateway, stub: oip_grpc.GRPCInferenceServiceStub, model_root: Path
) -> None:
    digest = write_simple(model_root, "simple", "2")
    load = oip.RepositoryModelLoadRequest(model_name="simple")
    for key, value in {"version": "2", "path": "simple/2/model.onnx", "sha256": digest, "reason": "try 2"}.items():
        load.parameters[key].string_param = value
    for metadata, code in (((), "UNAUTHENTICATED"), (bearer("not-a-token-at-all"), "PERMISSION_DENIED")):
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(load, metadata=metadata)
        assert err.value.code() == getattr(grpc.StatusCode, code)
    stub.RepositoryModelLoad(load, metadata=bearer(CI_TOKEN))
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True)).models
    assert ("simple", "2", "READY") in {(m.name, m.version, m.state) for m in index}
    assert stub.ModelReady(oip.ModelReadyRequest(name="simple", version="2")).ready
    unload = oip.RepositoryModelUnloadRequest(model_name="simple")
    unload.parameters["version"].string_param = "2"
    stub.RepositoryModelUnload(unload, metadata=bearer(CI_TOKEN))
    assert not stub.ModelReady(oip.ModelReadyRequest(name="simple", version="2")).ready
    audit = [(e.actor, e.action, e.reason) for e in triton.gateway.control.audit("simple")]
    assert ("ci", "load", "try 2") in audit
    assert ("ci", "unload", "RepositoryModelLoad/Unload over the Open Inference Protocol") in audit
    unload.parameters["version"].string_param = "1"  # takes all the traffic
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelUnload(unload, metadata=bearer(CI_TOKEN))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
