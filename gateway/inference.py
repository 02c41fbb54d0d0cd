"""`InferenceService`: one request end to end, transport-free.

Route (one read of the current route table), check the inputs against the chosen version's
signature and the endpoint's limits, run the model, and return the outputs with the version,
arm and route revision that served them. Errors are raised as domain errors; the transport
maps them to statuses in one place.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gateway import __version__
from gateway.errors import InvalidInput, NotFound, TooLarge
from gateway.registry import ModelRegistry
from gateway.routing import EndpointRoutes, ModelRef, RouteDecision, Router, RoutingReason
from gateway.tensors import DataType, TensorSpec

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "model-gateway"


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A prediction request after decoding: named input arrays and how to route them."""

    model: ModelRef
    inputs: Mapping[str, np.ndarray]
    routing_key: str = ""
    request_id: str = ""
    output_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InferResult:
    """Outputs of one request and what served it."""

    request_id: str
    endpoint: str
    version: str
    arm: str
    reason: RoutingReason
    route_revision: int
    outputs: dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class EndpointMetadata:
    """What a client needs to call an endpoint (the Open Inference Protocol's model metadata)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    served_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


def _check_inputs(
    routes: EndpointRoutes,
    decision: RouteDecision,
    specs: tuple[TensorSpec, ...],
    inputs: Mapping[str, np.ndarray],
) -> None:
    where = f"{routes.name} {decision.version}"
    if len(inputs) != len(specs) or any(spec.name not in inputs for spec in specs):
        expected = ", ".join(f"{s.name} ({s.describe()})" for s in specs)
        missing = [s.name for s in specs if s.name not in inputs]
        names = {s.name for s in specs}
        unexpected = [name for name in inputs if name not in names]
        problem = f"missing input {', '.join(map(repr, missing))}" if missing else ""
        if unexpected:
            problem += ("; " if problem else "") + f"unexpected input {', '.join(map(repr, unexpected))}"
        raise InvalidInput(f"{where}: {problem}; expected inputs: {expected}")
    batch = None
    for spec in specs:
        array = inputs[spec.name]
        if array.dtype != spec.datatype.numpy:
            raise InvalidInput(
                f"{where}: input {spec.name!r} has datatype {_datatype_name(array)}; "
                f"expected {spec.datatype.value} (shape {spec.wire_shape})"
            )
        shape = array.shape
        if len(shape) != len(spec.shape) or any(
            want is not None and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise InvalidInput(
                f"{where}: input {spec.name!r} has shape {list(shape)}; expected {spec.wire_shape} "
                "(-1 is any size)"
            )
        if spec.shape and spec.shape[0] is None:
            batch = shape[0]
            if batch > routes.max_batch_size:
                raise TooLarge(
                    f"{where}: batch size {batch} of input {spec.name!r} exceeds the endpoint's "
                    f"max_batch_size {routes.max_batch_size}; split the request"
                )
        if routes.reject_nan and array.dtype.kind == "f" and np.isnan(array).any():
            index = [int(i) for i in np.argwhere(np.isnan(array))[0]]
            raise InvalidInput(
                f"{where}: input {spec.name!r} has NaN at index {index}; this endpoint's nan_policy is "
                "'reject' (finite values only)"
            )


def _datatype_name(array: np.ndarray) -> str:
    try:
        return DataType.of(array.dtype).value
    except InvalidInput:
        return str(array.dtype)


class InferenceService:
    """Serves predictions: routing, input checks, model run. Shared by every transport."""

    def __init__(self, registry: ModelRegistry, router: Router) -> None:
        self._registry = registry
        self._router = router

    def infer(self, request: InferRequest) -> InferResult:
        """Route and run one request."""
        table = self._router.table
        ref = request.model
        routes = table.endpoint(ref.endpoint)
        decision = routes.resolve(ref, request.routing_key)
        model = self._registry.runnable(routes.name, decision.version)
        _check_inputs(routes, decision, model.inputs, request.inputs)
        wanted = request.output_names
        if wanted:
            for name in wanted:
                if name not in model.output_names:
                    raise InvalidInput(
                        f"{routes.name} {decision.version} has no output {name!r}; "
                        f"outputs: {', '.join(model.output_names)}"
                    )
        else:
            wanted = model.output_names
        arrays = model.run(request.inputs, wanted)
        return InferResult(
            request_id=request.request_id or uuid.uuid4().hex,
            endpoint=routes.name,
            version=decision.version,
            arm=decision.arm,
            reason=decision.reason,
            route_revision=table.revision,
            outputs=dict(zip(wanted, arrays, strict=True)),
        )

    # --- metadata and readiness -------------------------------------------------------------

    def endpoint_metadata(self, endpoint: str, version: str = "") -> EndpointMetadata:
        """Signature of a version (the pinned one, else the stable or heaviest-weighted one)."""
        routes = self._router.table.endpoint(endpoint)
        served = self._resolve_version(routes, version)
        snapshot = self._registry.get(routes.name, served)
        return EndpointMetadata(
            name=routes.name,
            versions=routes.versions,
            platform=PLATFORM,
            inputs=snapshot.inputs,
            outputs=snapshot.outputs,
            served_version=served,
            labels=routes.labels,
        )

    def is_ready(self, endpoint: str, version: str = "") -> bool:
        """A version is ready when loaded; an endpoint when every version with traffic is."""
        routes = self._router.table.endpoints.get(endpoint)
        if routes is None:
            return False
        if version:
            try:
                return self._registry.is_ready(routes.name, self._resolve_version(routes, version))
            except NotFound:
                return False
        return all(self._registry.is_ready(routes.name, v) for v, w in routes.weights.items() if w > 0)

    def server_ready(self) -> bool:
        """Every endpoint can serve its weighted traffic."""
        return all(self.is_ready(name) for name in self._router.table.endpoints)

    def endpoints(self) -> list[str]:
        """Names of the served endpoints."""
        return sorted(self._router.table.endpoints)

    @staticmethod
    def _resolve_version(routes: EndpointRoutes, version: str) -> str:
        if version:
            if version in routes.versions:
                return version
            if version in routes.labels:
                return routes.labels[version]
            routes.pin(version)  # raises NotFound listing the versions
        if "stable" in routes.labels:
            return routes.labels["stable"]
        return max(routes.weights, key=lambda v: routes.weights[v])

    @staticmethod
    def server_metadata() -> tuple[str, str, tuple[str, ...]]:
        """Name, version and protocol extensions of this server."""
        return SERVER_NAME, __version__, ()
