"""pb2 <-> domain conversion. Generated protobuf types stop here."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gateway.errors import InvalidInput
from gateway.feedback import FeedbackResult, Join
from gateway.inference import EndpointMetadata, InferRequest, InferResult
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.tensors import DataType, TensorSpec, array_from_bytes, array_from_values

ROUTING_KEY_PARAMETER = "routing_key"
#: The Open Inference Protocol response parameter that carries the feedback id.
FEEDBACK_ID_PARAMETER = "feedback_id"
_JOIN_TO_PB = {
    Join.JOINED: gw.FEEDBACK_RESULT_JOINED,
    Join.UNKNOWN: gw.FEEDBACK_RESULT_UNKNOWN,
    Join.LATE: gw.FEEDBACK_RESULT_LATE,
    Join.FORGED: gw.FEEDBACK_RESULT_FORGED,
}

_TO_PB = {d: gw.DataType.Value(f"DATA_TYPE_{d.value}") for d in DataType}
_NUMPY_FROM_PB = {pb: d.numpy for d, pb in _TO_PB.items()}
# Native little-endian dtypes encode as they are; anything else is converted first.
_PB_BY_DTYPE = {d.numpy: pb for d, pb in _TO_PB.items()}
_VALID_PB = ", ".join(f"DATA_TYPE_{d.value}" for d in DataType)

# --- gateway.v1 ---------------------------------------------------------------------------


def predict_request(request: gw.PredictRequest) -> InferRequest:
    """Decode a Predict request; tensors become arrays over the request's bytes (no copy)."""
    inputs: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        name = tensor.name
        dtype = _NUMPY_FROM_PB.get(tensor.datatype)
        if dtype is None or name in inputs:
            _explain_tensor(tensor, inputs)
        inputs[name] = array_from_bytes(tensor.data, dtype, tensor.shape, name=name)  # type: ignore[arg-type]
    return InferRequest(
        model=request.model,
        inputs=inputs,
        routing_key=request.routing_key,
        request_id=request.request_id,
        output_names=tuple(request.output_names) if request.output_names else (),
    )


def _explain_tensor(tensor: gw.Tensor, seen: dict[str, np.ndarray]) -> None:
    what = f"input {tensor.name!r}"
    if tensor.name in seen:
        raise InvalidInput(f"{what} is given twice; each input tensor must appear once")
    raise InvalidInput(f"{what} has datatype {tensor.datatype}; valid datatypes: {_VALID_PB}")


def predict_response(result: InferResult) -> gw.PredictResponse:
    """Encode a result as raw little-endian tensors."""
    response = gw.PredictResponse(
        request_id=result.request_id,
        model=result.endpoint,
        version=result.version,
        arm=result.arm,
        route_revision=result.route_revision,
        feedback_id=result.feedback_id,
    )
    add = response.outputs.add
    for name, array in result.outputs.items():
        datatype = _PB_BY_DTYPE.get(array.dtype) or _TO_PB[DataType.of(array.dtype)]
        add(name=name, datatype=datatype, shape=array.shape, data=_little_endian_bytes(array))
    return response


def feedback_response(result: FeedbackResult) -> gw.FeedbackResponse:
    """What became of an outcome."""
    return gw.FeedbackResponse(
        joined=result.joined,
        model=result.endpoint,
        version=result.version,
        arm=result.arm,
        result=_JOIN_TO_PB[result.result],
    )


def tensor(name: str, array: np.ndarray) -> gw.Tensor:
    """One array as a gateway.v1 tensor (raw little-endian bytes), as clients send inputs."""
    datatype = _PB_BY_DTYPE.get(array.dtype) or _TO_PB[DataType.of(array.dtype)]
    return gw.Tensor(name=name, datatype=datatype, shape=array.shape, data=_little_endian_bytes(array))


def tensor_array(tensor: gw.Tensor) -> np.ndarray:
    """One gateway.v1 tensor as an array, with the same checks as a request's (InvalidInput)."""
    dtype = _NUMPY_FROM_PB.get(tensor.datatype)
    if dtype is None:
        _explain_tensor(tensor, {})
    return array_from_bytes(tensor.data, dtype, tensor.shape, name=tensor.name)  # type: ignore[arg-type]


def _little_endian_bytes(array: np.ndarray) -> bytes:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


# --- Open Inference Protocol v2 -------------------------------------------------------------

_CONTENTS_FIELD = {
    DataType.BOOL: "bool_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
}


def _routing_key(request: oip.ModelInferRequest) -> str:
    if ROUTING_KEY_PARAMETER not in request.parameters:
        return ""
    parameter = request.parameters[ROUTING_KEY_PARAMETER]
    choice = parameter.WhichOneof("parameter_choice")
    if choice == "string_param":
        return parameter.string_param
    if choice in ("int64_param", "uint64_param"):
        return str(getattr(parameter, choice))
    raise InvalidInput(f"parameter {ROUTING_KEY_PARAMETER!r} must be a string (got {choice})")


def model_infer_request(request: oip.ModelInferRequest) -> InferRequest:
    """Decode ModelInfer: raw_input_contents (one per input, in order) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one entry per input, in the order of 'inputs'"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        what = f"input {tensor.name!r}"
        if tensor.name in inputs:
            raise InvalidInput(f"{what} is given twice; each input tensor must appear once")
        datatype = DataType.parse(tensor.datatype, what=what)
        if raw:
            # An empty `contents {}` beside the raw bytes (MLServer's raw codec sends one) is no conflict.
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(f"{what} has values in both contents and raw_input_contents; use one")
            inputs[tensor.name] = array_from_bytes(raw[index], datatype.numpy, tensor.shape, name=tensor.name)
        else:
            inputs[tensor.name] = array_from_values(
                _typed_contents(tensor.contents, datatype, what), datatype, tensor.shape, what=what
            )
    if not request.model_name:
        raise InvalidInput("model_name is empty; give an endpoint name")
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=inputs,
        routing_key=_routing_key(request),
        request_id=request.id,
        output_names=tuple(o.name for o in request.outputs),
    )


def _typed_contents(contents: oip.InferTensorContents, datatype: DataType, what: str) -> Sequence[object]:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"{what}: {datatype.value} must be sent as raw_input_contents")
    values: Sequence[object] = getattr(contents, field)
    return values


def model_infer_response(result: InferResult) -> oip.ModelInferResponse:
    """Encode a result with raw_output_contents."""
    response = oip.ModelInferResponse(model_name=result.endpoint, model_version=result.version, id=result.request_id)
    add_output = response.outputs.add
    raw = response.raw_output_contents
    for name, array in result.outputs.items():
        add_output(name=name, datatype=DataType.of(array.dtype).value, shape=array.shape)
        raw.append(_little_endian_bytes(array))
    if result.feedback_id:
        response.parameters[FEEDBACK_ID_PARAMETER].string_param = result.feedback_id
    return response


def _tensor_metadata(specs: Sequence[TensorSpec]) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    return [
        oip.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype.value, shape=s.wire_shape)
        for s in specs
    ]


def model_metadata_response(metadata: EndpointMetadata) -> oip.ModelMetadataResponse:
    """Encode endpoint metadata."""
    return oip.ModelMetadataResponse(
        name=metadata.name,
        versions=list(metadata.versions),
        platform=metadata.platform,
        inputs=_tensor_metadata(metadata.inputs),
        outputs=_tensor_metadata(metadata.outputs),
    )
