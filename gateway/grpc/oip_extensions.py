"""pb2 <-> domain conversion for the Triton extensions of the Open Inference Protocol.

Model configuration, statistics, the repository index and its load/unload parameters, and
the replies of `ModelStreamInfer`. Generated protobuf types stop here, as in `converters`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grpc

from gateway.control import VersionInfo
from gateway.errors import InvalidInput
from gateway.inference import EndpointMetadata
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import model_config_pb2 as mc
from gateway.routing import version_sort_key
from gateway.telemetry.metrics import VersionTotals
from gateway.tensors import TensorSpec

BACKEND = "onnxruntime"
#: Registry states as Triton's repository index names them.
_INDEX_STATE = {"ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE", "draining": "UNLOADING"}
_LOAD_PARAMETERS = ("version", "path", "sha256", "reason")


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    shape = spec.wire_shape
    return shape[1:] if batched else shape


def model_config_response(metadata: EndpointMetadata) -> oip.ModelConfigResponse:
    """A config that tells the truth about the endpoint's served version.

    `max_batch_size` is the endpoint's limit when every input has a variable first dimension
    (then `dims` leave it out, as Triton's do), else 0 with the full shapes. Version names
    that are integers give a `specific` version policy; others (`1.12`) cannot, so the policy
    is `all` (every listed version is loaded) and the names are in `parameters`.
    """
    batched = bool(metadata.inputs) and all(s.batched for s in (*metadata.inputs, *metadata.outputs))
    config = mc.ModelConfig(
        name=metadata.name,
        platform=metadata.platform,
        backend=BACKEND,
        max_batch_size=metadata.max_batch_size if batched else 0,
    )
    for spec in metadata.inputs:
        config.input.add(name=spec.name, data_type=mc.DataType.Value(f"TYPE_{spec.datatype.value}"),
                         dims=_dims(spec, batched))  # fmt: skip
    for spec in metadata.outputs:
        config.output.add(name=spec.name, data_type=mc.DataType.Value(f"TYPE_{spec.datatype.value}"),
                          dims=_dims(spec, batched))  # fmt: skip
    if all(v.isdigit() for v in metadata.versions):
        config.version_policy.specific.versions.extend(int(v) for v in metadata.versions)
    else:
        config.version_policy.all.SetInParent()
    facts = {
        "versions": ",".join(metadata.versions),
        "served_version": metadata.served_version,
        "traffic": ",".join(f"{v}={metadata.traffic[v]}" for v in sorted(metadata.traffic, key=version_sort_key)),
        "labels": ",".join(f"{k}={v}" for k, v in sorted(metadata.labels.items())),
    }
    for key, value in facts.items():
        config.parameters[key].string_value = value
    return oip.ModelConfigResponse(config=config)


def _duration(count: int, seconds: float) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=count, ns=round(seconds * 1e9))


def model_statistics_response(
    versions: Iterable[VersionInfo], totals: Mapping[tuple[str, str], VersionTotals]
) -> oip.ModelStatisticsResponse:
    """Per version: success and fail counts with cumulative durations, as Triton reports them.

    `inference_count` is the rows the successful requests carried, `execution_count` the model
    runs (a batch of several requests is one run), and `compute_infer` those runs' time.
    `queue` stays zero: requests wait only in a batch, and that wait is part of `success`.
    """
    response = oip.ModelStatisticsResponse()
    for info in versions:
        t = totals.get((info.endpoint, info.version), VersionTotals())
        response.model_stats.add(
            name=info.endpoint,
            version=info.version,
            last_inference=round(t.last_at * 1000),
            inference_count=t.success_rows,
            execution_count=round(t.executions),
            inference_stats=oip.InferStatistics(
                success=_duration(t.success_count, t.success_seconds),
                fail=_duration(t.fail_count, t.fail_seconds),
                compute_infer=_duration(round(t.executions), t.compute_seconds),
            ),
        )
    return response


def repository_index_response(versions: Iterable[VersionInfo], ready_only: bool) -> oip.RepositoryIndexResponse:
    """Every endpoint's versions with their state (READY, LOADING, UNAVAILABLE) and why."""
    response = oip.RepositoryIndexResponse()
    for info in versions:
        state = _INDEX_STATE.get(info.state, "UNAVAILABLE")
        if ready_only and state != "READY":
            continue
        response.models.add(name=info.endpoint, version=info.version, state=state, reason=info.error)
    return response


def repository_parameters(
    model: str, parameters: Mapping[str, oip.ModelRepositoryParameter], allowed: Sequence[str] = _LOAD_PARAMETERS
) -> dict[str, str]:
    """String parameters of a load/unload request; anything else is refused, naming what is valid."""
    values = {}
    for key, parameter in parameters.items():
        if key == "unload_dependents":  # tritonclient always sends it; an endpoint has no dependents
            continue
        if key == "config" or key.startswith("file:"):
            raise InvalidInput(
                f"failed to load {model!r}: the gateway does not take model configs or files over the "
                "protocol; a version is an immutable artifact under the model root, loaded with the "
                f"string parameters {', '.join(allowed)}"
            )
        if key not in allowed or parameter.WhichOneof("parameter_choice") != "string_param":
            raise InvalidInput(f"parameter {key!r} is not valid here; valid string parameters: {', '.join(allowed)}")
        values[key] = parameter.string_param
    return values


def stream_reply(response: oip.ModelInferResponse) -> oip.ModelStreamInferResponse:
    """A successful stream message."""
    return oip.ModelStreamInferResponse(infer_response=response)


def stream_refusal(
    request: oip.ModelInferRequest, status: grpc.StatusCode, message: str
) -> oip.ModelStreamInferResponse:
    """A failed stream message: the status and message in `error_message`, the request's id kept."""
    return oip.ModelStreamInferResponse(
        error_message=f"{status.name}: {message}",
        infer_response=oip.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


def stamp_stream(response: oip.ModelStreamInferResponse, trace_id: str) -> None:
    """Put a traced stream message's trace id into its reply parameters (`trace_id`)."""
    response.infer_response.parameters["trace_id"].string_param = trace_id
