"""`InferenceService`: one request end to end, transport-free.

Route (one read of the current route table), check the inputs against the chosen version's
signature and the endpoint's limits, run the model, and return the outputs with the version,
arm and route revision that served them. Errors are raised as domain errors; the transport
maps them to statuses in one place.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np

from gateway import __version__
from gateway.admission import Admission, Slot
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, NotFound, TooLarge
from gateway.faults import Fault, FaultInjector
from gateway.feedback import FeedbackJoin
from gateway.limits import MAX_ID_CHARS, MAX_NAME_CHARS, MAX_TENSOR_NAME_CHARS, MAX_TENSORS, check_count, check_text
from gateway.logs import REQUEST_ID
from gateway.registry import ModelRegistry
from gateway.routing import STABLE, EndpointRoutes, ModelRef, RouteDecision, Router, RouteTable, RoutingReason
from gateway.runtime import OnnxModel
from gateway.shadow.runner import ShadowJob, ShadowRunner
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.tracing import SpanRecord
from gateway.telemetry.windows import SeriesKey
from gateway.tensors import DataType, TensorSpec

PLATFORM = "onnxruntime_onnx"
#: Live (weighted) traffic is mirrored to shadows; explicitly pinned requests are not.
_MIRRORED = frozenset({RoutingReason.WEIGHT, RoutingReason.STICKY})
SERVER_NAME = "model-gateway"
#: Requests in flight per version unless configured otherwise (`max_concurrent_per_version`).
DEFAULT_CONCURRENCY = 64


class InferRequest(NamedTuple):
    """A prediction request after decoding: named input arrays and how to route them.

    `model` is `name`, `name@version` or `name:label`; `version` (the Open Inference
    Protocol's model_version) names a version or label explicitly. A NamedTuple rather
    than a frozen dataclass: immutable too, and several times cheaper to build per request.
    """

    model: str
    inputs: Mapping[str, np.ndarray]
    routing_key: str = ""
    request_id: str = ""
    output_names: tuple[str, ...] = ()
    version: str = ""


class InferResult(NamedTuple):
    """Outputs of one request and what served it (a NamedTuple for the same reason)."""

    request_id: str
    endpoint: str
    version: str
    arm: str
    reason: RoutingReason
    route_revision: int
    outputs: dict[str, np.ndarray]
    #: Injected latency (a fault drill) the transport waits before answering, without blocking.
    delay_seconds: float = 0.0
    #: The signed id the client sends its outcome with, to any process ("" when feedback is off).
    feedback_id: str = ""


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
    max_batch_size: int = 0
    traffic: Mapping[str, int] = field(default_factory=dict)


def _check_inputs(
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


def _rows_and_nans(model: OnnxModel, inputs: Mapping[str, np.ndarray]) -> tuple[int, list[int] | None, tuple[str, ...]]:
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


def _wanted_outputs(
    routes: EndpointRoutes, decision: RouteDecision, model: OnnxModel, names: tuple[str, ...]
) -> tuple[str, ...]:
    """The outputs a request asked for (all when none), or InvalidInput naming the unknown one."""
    for name in names:
        if name not in model.output_names:
            raise InvalidInput(
                f"{routes.name} {decision.version} has no output {name!r}; outputs: {', '.join(model.output_names)}"
            )
    return names or model.output_names


def _timed_run(  # noqa: PLR0917 - per request: positional is cheaper
    time_left: Callable[[], float | None] | None,
    routes: EndpointRoutes,
    decision: RouteDecision,
    model: OnnxModel,
    inputs: Mapping[str, np.ndarray],
    wanted: tuple[str, ...],
) -> tuple[list[np.ndarray], float]:
    """The model's outputs (within the caller's deadline, when there is one) and how long the run took."""
    ran = time.perf_counter()
    if time_left is None:
        arrays = model.run(inputs, wanted)
    else:
        arrays = _run_within(time_left, routes, decision, model, inputs, wanted)
    return arrays, time.perf_counter() - ran


def _run_within(  # noqa: PLR0917 - per request: positional is cheaper
    time_left: Callable[[], float | None],
    routes: EndpointRoutes,
    decision: RouteDecision,
    model: OnnxModel,
    inputs: Mapping[str, np.ndarray],
    wanted: tuple[str, ...],
) -> list[np.ndarray]:
    """Run the model unless the caller's deadline has passed; DEADLINE_EXCEEDED if it passes meanwhile."""
    where = f"{routes.name} {decision.version}: the caller's deadline passed"
    remaining = time_left()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"{where} before the model ran; it was not run")
    arrays = model.run(inputs, wanted)
    remaining = time_left()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"{where} while the model ran; the answer was dropped")
    return arrays


def _datatype_name(array: np.ndarray) -> str:
    try:
        return DataType.of(array.dtype).value
    except InvalidInput:
        return str(array.dtype)


def _check_bounds(request: InferRequest) -> None:
    """Every caller-chosen string of a request within its limit (it is echoed, logged, remembered)."""
    check_text(request.model, "model", MAX_NAME_CHARS)
    check_text(request.version, "model_version", MAX_NAME_CHARS)
    check_text(request.request_id, "request_id", MAX_ID_CHARS)
    check_text(request.routing_key, "routing_key", MAX_ID_CHARS)
    check_count(len(request.output_names), "output_names", MAX_TENSORS)
    for index, name in enumerate(request.output_names):
        check_text(name, f"output_names[{index}]", MAX_TENSOR_NAME_CHARS)


def _route(table: RouteTable, request: InferRequest) -> tuple[EndpointRoutes, RouteDecision]:
    routes = table.endpoints.get(request.model)
    if routes is not None:  # the common case: a bare endpoint name
        if request.version:
            return routes, routes.resolve(ModelRef(routes.name, version=request.version), "")
        return routes, routes.choose(request.routing_key)
    ref = ModelRef.parse(request.model)
    if request.version and (ref.version or ref.label):
        raise InvalidInput(f"model {request.model!r} selects a version; do not also set model_version")
    routes = table.endpoint(ref.endpoint)
    if request.version:
        ref = ModelRef(ref.endpoint, version=request.version)
    return routes, routes.resolve(ref, request.routing_key)


class InferenceService:
    """Serves predictions: routing, input checks, model run. Shared by every transport."""

    def __init__(
        self,
        registry: ModelRegistry,
        router: Router,
        telemetry: Telemetry | None = None,
        *,
        shadow: ShadowRunner | None = None,
        faults: FaultInjector | None = None,
        feedback: FeedbackJoin | None = None,
        admission: Admission | None = None,
    ) -> None:
        self._registry = registry
        self._admission = admission or Admission(DEFAULT_CONCURRENCY)
        self._router = router
        self._telemetry = telemetry or Telemetry()
        self._shadow = shadow
        self._faults = faults or FaultInjector()
        self._feedback = feedback
        # Request ids: 16 hex digits random per process + a 16-digit counter. No syscall per
        # request (os.urandom after a GIL-releasing model run costs several microseconds).
        self._series_keys: dict[tuple[str, str, bool], SeriesKey] = {}
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def infer(
        self, request: InferRequest, span: SpanRecord | None = None, time_left: Callable[[], float | None] | None = None
    ) -> InferResult:
        """Route and run one request; every routed request is measured, failed or not.

        `time_left` gives the seconds left before the caller's deadline (None: no deadline). The
        request's deadline is the caller's, or the endpoint's `deadline_ms`, or the gateway's
        default, whichever comes first (`gateway/admission.py`): a request whose deadline has
        passed is not run, and one whose deadline passed while the model ran fails with
        DEADLINE_EXCEEDED (the caller is gone); both count as timeouts.
        """
        started = time.perf_counter()
        if (
            len(request.request_id) > MAX_ID_CHARS
            or len(request.routing_key) > MAX_ID_CHARS
            or len(request.model) > MAX_NAME_CHARS
            or request.version
            or request.output_names
        ):
            _check_bounds(request)  # the common request (short ids, no version, all outputs) skips it
        table = self._router.table
        routes, decision = _route(table, request)
        request_id = request.request_id or self._new_request_id()
        REQUEST_ID.set(request_id)  # log lines about this request carry its id (each call has its own context)
        if span is not None:
            span.attributes.update(
                {
                    "gateway.endpoint": routes.name,
                    "gateway.version": decision.version,
                    "gateway.arm": decision.arm,
                    "gateway.routing": decision.reason.value,
                    "gateway.route_revision": table.revision,
                    "gateway.request_id": request_id,
                }
            )
        rows: int = 0
        nan: list[int] | None = None
        features: tuple[str, ...] = ()
        fault = self._faults.get(routes.name, decision.version)
        # Requests that named their version are measured apart from the weighted traffic guardrails judge.
        pinned = decision.reason is RoutingReason.PINNED or decision.reason is RoutingReason.LABEL
        series = self._series(routes.name, decision.version, pinned)
        try:
            # Admission control (gateway/admission.py): a slot in the version's limit, within the deadline.
            admission = self._admission
            deadline = admission.deadline(time_left() if time_left is not None else None, routes.deadline)
            with admission.admit(routes.name, decision.version, deadline) as slot:
                if fault is not None:
                    started -= fault.latency_ms / 1000  # the injected delay counts as this version's latency
                    self._inject(fault, routes.name, decision.version, span, slot, deadline)
                model = self._registry.runnable(routes.name, decision.version)
                _check_inputs(routes, decision, model.inputs, request.inputs)
                rows, nan, features = _rows_and_nans(model, request.inputs)
                wanted = _wanted_outputs(routes, decision, model, request.output_names)
                left = None if deadline is None else partial(admission.left, deadline)
                arrays, run_seconds = _timed_run(left, routes, decision, model, request.inputs, wanted)
        except GatewayError as err:
            self._measure(series, decision.arm, err.code.name, started, rows, nan, features, span)
            raise
        except Exception:
            self._measure(series, decision.arm, "INTERNAL", started, rows, nan, features, span)
            raise
        self._measure(series, decision.arm, "OK", started, rows, nan, features, span)
        feedback_id = ""
        if self._feedback is not None:
            self._feedback.served(request_id, series, decision.arm)
            feedback_id = self._feedback.feedback_id(series, decision.arm)
        outputs = dict(zip(wanted, arrays, strict=True))
        if not pinned:
            self._telemetry.drift.observe(
                routes.name,
                decision.version,
                decision.arm,
                model.float_inputs,
                request.inputs,
                outputs.get(model.output_names[0]),
            )
        if routes.mirror and self._shadow is not None and decision.reason in _MIRRORED:
            # The shadow report compares like with like: this request's model run (plus any injected delay).
            delay = fault.latency_ms / 1000 if fault is not None else 0.0
            self._mirror(routes, decision, request, request_id, outputs, run_seconds + delay, span)
        return InferResult(
            request_id=request_id,
            endpoint=routes.name,
            version=decision.version,
            arm=decision.arm,
            reason=decision.reason,
            route_revision=table.revision,
            outputs=outputs,
            delay_seconds=fault.latency_ms / 1000 if fault is not None else 0.0,
            feedback_id=feedback_id,
        )

    def _inject(  # noqa: PLR0917 - rare path, kept out of infer
        self, fault: Fault, endpoint: str, version: str, span: SpanRecord | None, slot: Slot, deadline: float | None
    ) -> None:
        """A fault drill: maybe fail, and hold the version's slot for the injected latency (not past the deadline)."""
        if span is not None:
            span.attributes["gateway.fault"] = f"error_rate={fault.error_rate:g},latency_ms={fault.latency_ms:g}"
        injected = fault.error(endpoint, version)
        if injected is not None:
            raise injected
        delay = fault.latency_ms / 1000
        left = self._admission.left(deadline)
        if left is not None and delay > left:
            slot.hold(max(0.0, left))  # it occupies the version until the deadline, as a slow run would
            raise DeadlineExceeded(
                f"{endpoint} {version}: the answer would come after the request's deadline "
                f"({fault.latency_ms:g} ms injected latency, {1000 * max(0.0, left):.0f} ms left)"
            )
        slot.hold(delay)

    def _mirror(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        routes: EndpointRoutes,
        decision: RouteDecision,
        request: InferRequest,
        request_id: str,
        outputs: dict[str, np.ndarray],
        seconds: float,
        span: SpanRecord | None,
    ) -> None:
        """Hand a copy to the shadow runner for each shadow sampled (never blocks)."""
        assert self._shadow is not None
        for version, fraction in routes.mirror:
            if version != decision.version and random.random() < fraction:
                self._shadow.offer(
                    ShadowJob(
                        endpoint=routes.name,
                        shadow_version=version,
                        primary_version=decision.version,
                        request_id=request_id,
                        routing_key=request.routing_key,
                        inputs=request.inputs,
                        primary_outputs=outputs,
                        primary_seconds=seconds,
                        span=span,
                    )
                )

    def _measure(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        series: SeriesKey,
        arm: str,
        code: str,
        started: float,
        rows: int,
        nan: list[int] | None,
        features: tuple[str, ...],
        span: SpanRecord | None,
    ) -> float:
        seconds = time.perf_counter() - started
        self._telemetry.record(series, arm, code, seconds, rows, nan, features)
        if span is not None:
            span.attributes["gateway.batch_size"] = rows
        return seconds

    def abandoned(self, result: InferResult) -> None:
        """The caller of a request already answered had gone before the answer left (a timeout)."""
        pinned = result.reason is RoutingReason.PINNED or result.reason is RoutingReason.LABEL
        self._telemetry.abandoned(self._series(result.endpoint, result.version, pinned))

    def _series(self, endpoint: str, version: str, pinned: bool) -> SeriesKey:
        key = (endpoint, version, pinned)
        series = self._series_keys.get(key)
        if series is None:
            series = self._series_keys.setdefault(key, SeriesKey(endpoint, version, pinned))
        return series

    def _new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    # --- metadata and readiness -------------------------------------------------------------

    @property
    def admission(self) -> Admission:
        """The per-version concurrency limits and deadlines in front of the model runs."""
        return self._admission

    def endpoint_metadata(self, endpoint: str, version: str = "") -> EndpointMetadata:
        """Signature of a version (the pinned one, else the stable or heaviest-weighted one)."""
        check_text(endpoint, "name", MAX_NAME_CHARS)
        check_text(version, "version", MAX_NAME_CHARS)
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
            max_batch_size=routes.max_batch_size,
            traffic=routes.weights,
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
        """A named version or label (NotFound listing the versions), else stable or the heaviest-weighted."""
        if version:
            return routes.resolve(ModelRef(routes.name, version=version), "").version
        if STABLE in routes.labels:
            return routes.labels[STABLE]
        return max(routes.weights, key=lambda v: routes.weights[v])

    @staticmethod
    def server_metadata() -> tuple[str, str, tuple[str, ...]]:
        """Name, version and protocol extensions of this server."""
        return SERVER_NAME, __version__, ()
