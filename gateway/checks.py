"""A routed request against its version's signature and its endpoint's limits.

Names, datatypes, shapes, the batch limit and the NaN policy of the inputs, the outputs asked
for, and the caller-chosen strings; each refusal says what was wrong and what is valid.
Pure functions of the request: `InferenceService` calls them before a request is run or
queued, so a bad request never joins a batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from gateway.errors import InvalidInput, TooLarge
from gateway.limits import MAX_ID_CHARS, MAX_NAME_CHARS, MAX_TENSOR_NAME_CHARS, MAX_TENSORS, check_count, check_text
from gateway.routing import EndpointRoutes, RouteDecision
from gateway.runtime import OnnxModel
from gateway.tensors import DataType, TensorSpec


def check_inputs(
    routes: EndpointRoutes,
    decision: RouteDecision,
    specs: tuple[TensorSpec, ...],
    inputs: Mapping[str, np.ndarray],
) -> None:
    """Names, dtypes, shapes, batch limit and NaN policy; the common case is a few comparisons."""
    if len(inputs) != len(specs):
        _explain_names(routes, decision, specs, inputs)
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            _explain_names(routes, decision, specs, inputs)
            return
        if not spec.matches(array):
            _explain_mismatch(routes, decision, spec, array)
        if spec.batched and array.shape[0] > routes.max_batch_size:
            raise TooLarge(
                f"{routes.name} {decision.version}: batch size {array.shape[0]} of input {spec.name!r} "
                f"exceeds the endpoint's max_batch_size {routes.max_batch_size}; split the request"
            )
        if routes.reject_nan and array.dtype.kind == "f" and np.isnan(array).any():
            index = [int(i) for i in np.argwhere(np.isnan(array))[0]]
            raise InvalidInput(
                f"{routes.name} {decision.version}: input {spec.name!r} has NaN at index {index}; "
                "this endpoint's nan_policy is 'reject' (finite values only)"
            )


def _explain_names(
    routes: EndpointRoutes,
    decision: RouteDecision,
    specs: tuple[TensorSpec, ...],
    inputs: Mapping[str, np.ndarray],
) -> None:
    expected = ", ".join(f"{s.name} ({s.describe()})" for s in specs)
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in inputs]
    unexpected = [name for name in inputs if name not in names]
    problems = []
    if missing:
        problems.append(f"missing input {', '.join(map(repr, missing))}")
    if unexpected:
        problems.append(f"unexpected input {', '.join(map(repr, unexpected))}")
    raise InvalidInput(f"{routes.name} {decision.version}: {'; '.join(problems)}; expected inputs: {expected}")


def _explain_mismatch(routes: EndpointRoutes, decision: RouteDecision, spec: TensorSpec, array: np.ndarray) -> None:
    where = f"{routes.name} {decision.version}: input {spec.name!r}"
    if array.dtype != spec.dtype:
        raise InvalidInput(
            f"{where} has datatype {_datatype_name(array)}; expected {spec.datatype.value} (shape {spec.wire_shape})"
        )
    raise InvalidInput(f"{where} has shape {list(array.shape)}; expected {spec.wire_shape} (-1 is any size)")


def rows_and_nans(model: OnnxModel, inputs: Mapping[str, np.ndarray]) -> tuple[int, list[int] | None, tuple[str, ...]]:
    """Batch rows, and NaN counts per feature when any float input holds a NaN (else None)."""
    rows = 0
    nan: list[int] | None = None
    offset = 0
    for name, width in model.float_inputs:
        array = inputs[name]
        rows = rows or (array.shape[0] if array.ndim else 1)
        if not math.isnan(array.sum()):  # one reduction; a NaN anywhere makes the sum NaN
            offset += width
            continue
        mask = np.isnan(array)
        if mask.any():
            if nan is None:
                nan = [0] * model.feature_count
            per_feature = mask.reshape(mask.shape[0], -1).sum(axis=0) if mask.ndim > 1 else [int(mask.sum())]
            for i, count in enumerate(per_feature):
                nan[offset + i] += int(count)
        offset += width
    if not rows and inputs:
        first = next(iter(inputs.values()))
        rows = first.shape[0] if first.ndim else 1
    return rows, nan, model.feature_names


def wanted_outputs(
    routes: EndpointRoutes, decision: RouteDecision, model: OnnxModel, names: tuple[str, ...]
) -> tuple[str, ...]:
    """The outputs a request asked for (all when none), or InvalidInput naming the unknown one."""
    for name in names:
        if name not in model.output_names:
            raise InvalidInput(
                f"{routes.name} {decision.version} has no output {name!r}; outputs: {', '.join(model.output_names)}"
            )
    return names or model.output_names


def _datatype_name(array: np.ndarray) -> str:
    try:
        return DataType.of(array.dtype).value
    except InvalidInput:
        return str(array.dtype)


def check_bounds(model: str, version: str, request_id: str, routing_key: str, output_names: tuple[str, ...]) -> None:
    """Every caller-chosen string of a request within its limit (it is echoed, logged, remembered)."""
    check_text(model, "model", MAX_NAME_CHARS)
    check_text(version, "model_version", MAX_NAME_CHARS)
    check_text(request_id, "request_id", MAX_ID_CHARS)
    check_text(routing_key, "routing_key", MAX_ID_CHARS)
    check_count(len(output_names), "output_names", MAX_TENSORS)
    for index, name in enumerate(output_names):
        check_text(name, f"output_names[{index}]", MAX_TENSOR_NAME_CHARS)
