"""`InferenceService`: one request end to end, transport-free.

Route (one read of the current route table), check the inputs against the chosen version's
signature and the endpoint's limits, run the model, and return the outputs with the version,
arm and route revision that served them. Errors are raised as domain errors; the transport
maps them to statuses in one place.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from gateway import __version__
from gateway.admission import Admission, Slot
from gateway.batcher import Batcher
from gateway.batcher import Result as BatchResult
from gateway.checks import check_bounds, check_inputs, rows_and_nans, wanted_outputs
from gateway.errors import DeadlineExceeded, GatewayError, InvalidInput, NotFound
from gateway.faults import Fault, FaultInjector
from gateway.feedback import FeedbackJoin
from gateway.limits import MAX_ID_CHARS, MAX_NAME_CHARS, check_text
from gateway.logs import REQUEST_ID
from gateway.registry import ModelRegistry
from gateway.routing import STABLE, EndpointRoutes, ModelRef, RouteDecision, Router, RouteTable, RoutingReason
from gateway.runner import ModelRunner, timed_run
from gateway.runtime import OnnxModel
from gateway.shadow.runner import ShadowJob, ShadowRunner
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.tracing import SpanRecord
from gateway.telemetry.windows import SeriesKey
from gateway.tensors import TensorSpec

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


def _seconds_left(admission: Admission, deadline: float | None) -> float | None:
    """How long a waiting request may still wait (None: no deadline)."""
    left = admission.left(deadline)
    return None if left is None else max(0.0, left)


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


class _Call:
    """One routed request: what routing decided and what its measurement needs (it lives while the request waits)."""

    __slots__ = ("decision", "fault", "features", "nan", "pinned", "request_id", "revision", "routes", "rows",
                 "series", "span", "started")  # fmt: skip

    def __init__(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        started: float,
        routes: EndpointRoutes,
        decision: RouteDecision,
        revision: int,
        request_id: str,
        series: SeriesKey,
        pinned: bool,
        fault: Fault | None,
        span: SpanRecord | None,
    ) -> None:
        self.started = started
        self.routes = routes
        self.decision = decision
        self.revision = revision
        self.request_id = request_id
        self.series = series
        self.pinned = pinned
        self.fault = fault
        self.span = span
        self.rows = 0
        self.nan: list[int] | None = None
        self.features: tuple[str, ...] = ()


class InferenceService:
    """Serves predictions: routing, admission, input checks, model run. Shared by every transport.

    `serve` is the serving path: it applies the endpoint's batching and runs models inline or
    on the runner pool by their measured cost. `infer` runs the model inline, for in-process
    callers without an event loop (tools, tests, simulations).
    """

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
        runner: ModelRunner | None = None,
    ) -> None:
        self._registry = registry
        self._admission = admission or Admission(DEFAULT_CONCURRENCY)
        self._router = router
        self._telemetry = telemetry or Telemetry()
        self._shadow = shadow
        self._faults = faults or FaultInjector()
        self._feedback = feedback
        self.runner = runner or ModelRunner()
        self.batcher = Batcher(self.runner, self._admission.left)
        # Request ids: 16 hex digits random per process + a 16-digit counter. No syscall per
        # request (os.urandom after a GIL-releasing model run costs several microseconds).
        self._series_keys: dict[tuple[str, str, bool], SeriesKey] = {}
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    def infer(
        self, request: InferRequest, span: SpanRecord | None = None, time_left: Callable[[], float | None] | None = None
    ) -> InferResult:
        """Route and run one request inline (no batching, no runner thread); measured, failed or not.

        `time_left` gives the seconds left before the caller's deadline (None: no deadline). The
        request's deadline is the caller's, or the endpoint's `deadline_ms`, or the gateway's
        default, whichever comes first (`gateway/admission.py`): a request whose deadline has
        passed is not run, and one whose deadline passed while the model ran fails with
        DEADLINE_EXCEEDED (the caller is gone); both count as timeouts.
        """
        result = self._serve(request, span, time_left, False)
        assert isinstance(result, InferResult)
        return result

    def serve(
        self, request: InferRequest, span: SpanRecord | None = None, time_left: Callable[[], float | None] | None = None
    ) -> InferResult | Coroutine[Any, Any, InferResult]:
        """`infer`, with the endpoint's batching and the runner pool for runs that cost more than the inline limit.

        A request whose run happens inline is answered at once (an `InferResult`, no coroutine
        on the hot path); one that waits for a batch or a runner thread gets a coroutine to
        await, which holds the request's admission slot until its run is over.
        """
        return self._serve(request, span, time_left, True)

    def _serve(
        self,
        request: InferRequest,
        span: SpanRecord | None,
        time_left: Callable[[], float | None] | None,
        may_wait: bool,
    ) -> InferResult | Coroutine[Any, Any, InferResult]:
        started = time.perf_counter()
        if (
            len(request.request_id) > MAX_ID_CHARS
            or len(request.routing_key) > MAX_ID_CHARS
            or len(request.model) > MAX_NAME_CHARS
            or request.version
            or request.output_names
        ):
            # The common request (short ids, no version, all outputs) skips it.
            check_bounds(request.model, request.version, request.request_id, request.routing_key, request.output_names)
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
        # Requests that named their version are measured apart from the weighted traffic guardrails judge.
        pinned = decision.reason is RoutingReason.PINNED or decision.reason is RoutingReason.LABEL
        call = _Call(
            started,
            routes,
            decision,
            table.revision,
            request_id,
            self._series(routes.name, decision.version, pinned),
            pinned,
            self._faults.get(routes.name, decision.version),
            span,
        )
        admission = self._admission
        waits = False
        try:
            # Admission control (gateway/admission.py): a slot in the version's limit, within the deadline.
            deadline = admission.deadline(time_left() if time_left is not None else None, routes.deadline)
            slot = admission.admit(routes.name, decision.version, deadline)
            try:
                model, wanted = self._checked(call, request, slot, deadline)
                if may_wait and (
                    (routes.batching is not None and model.batchable)
                    or self.runner.off_loop(model, call.rows, routes.runner)
                ):
                    waits = True  # the coroutine owns the slot from here
                    return self._waited(call, request, model, wanted, slot, deadline)
                left = None if deadline is None else partial(admission.left, deadline)
                arrays, run_seconds = timed_run(left, routes, decision, model, request.inputs, wanted)
            finally:
                if not waits:
                    slot.release()
        except GatewayError as err:
            self._measure(call, err.code.name)
            raise
        except Exception:
            self._measure(call, "INTERNAL")
            raise
        return self._served(call, request, model, wanted, arrays, run_seconds)

    def _checked(
        self, call: _Call, request: InferRequest, slot: Slot, deadline: float | None
    ) -> tuple[OnnxModel, tuple[str, ...]]:
        """Faults, the ready model, input checks and the outputs to return: all before any queue."""
        routes, decision, fault = call.routes, call.decision, call.fault
        if fault is not None:
            call.started -= fault.latency_ms / 1000  # the injected delay counts as this version's latency
            self._inject(fault, routes.name, decision.version, call.span, slot, deadline)
        model = self._registry.runnable(routes.name, decision.version)
        check_inputs(routes, decision, model.inputs, request.inputs)
        call.rows, call.nan, call.features = rows_and_nans(model, request.inputs)
        return model, wanted_outputs(routes, decision, model, request.output_names)

    async def _waited(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        call: _Call,
        request: InferRequest,
        model: OnnxModel,
        wanted: tuple[str, ...],
        slot: Slot,
        deadline: float | None,
    ) -> InferResult:
        """The rest of `serve` for a request that waits: in a batch, or for a runner thread.

        The request's slot is held until its run is over (by the batcher, or the runner thread's
        completion when the caller leaves mid-run), never past it. A request still waiting at
        its deadline is answered DEADLINE_EXCEEDED at once, and its batch-mates run without it.
        """
        routes, decision = call.routes, call.decision
        admission = self._admission
        owned = True  # released here unless the batcher or the runner took it
        shared = 0
        batched: asyncio.Future[BatchResult] | None = None
        try:
            try:
                if routes.batching is not None and model.batchable:
                    batched = self.batcher.submit(
                        model, request.inputs, wanted, call.rows, routes.batching, routes.runner, slot, deadline
                    )
                    owned = False
                    async with asyncio.timeout(_seconds_left(admission, deadline)):
                        arrays, shared, run_seconds = await batched
                else:
                    left = None if deadline is None else partial(admission.left, deadline)
                    alone = self.runner.run(
                        timed_run, left, routes, decision, model, request.inputs, wanted, after=slot.release
                    )
                    owned = False
                    async with asyncio.timeout(_seconds_left(admission, deadline)):
                        arrays, run_seconds = await alone
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{routes.name} {decision.version}: the request's deadline passed while it waited for its "
                    "model run; it was answered without it"
                ) from None
        except GatewayError as err:
            self._measure(call, err.code.name)
            raise
        except asyncio.CancelledError:
            # The caller left (its deadline, or a cancellation): a timeout of this version for the guardrails.
            remaining = admission.left(deadline)
            self._measure(call, "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
            raise
        except Exception:
            self._measure(call, "INTERNAL")
            raise
        finally:
            if owned:
                slot.release()
            elif batched is not None and batched.cancelled():
                self.batcher.leave(model, batched)  # the caller left: not one more moment in the queue
        if shared and call.span is not None:
            call.span.attributes["gateway.batch.requests"] = shared
        return self._served(call, request, model, wanted, arrays, run_seconds, shared or 1)

    def _served(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        call: _Call,
        request: InferRequest,
        model: OnnxModel,
        wanted: tuple[str, ...],
        arrays: list[np.ndarray],
        run_seconds: float,
        shared: int = 1,
    ) -> InferResult:
        """Measure a served request, remember it for feedback, observe drift, mirror it to shadows, answer."""
        self._measure(call, "OK", run_seconds, shared)
        routes, decision, fault = call.routes, call.decision, call.fault
        feedback_id = ""
        if self._feedback is not None:
            self._feedback.served(call.request_id, call.series, decision.arm)
            feedback_id = self._feedback.feedback_id(call.series, decision.arm)
        outputs = dict(zip(wanted, arrays, strict=True))
        if not call.pinned:
            self._telemetry.drift.observe(
                routes.name,
                decision.version,
                decision.arm,
                model.float_inputs,
                request.inputs,
                outputs.get(model.output_names[0]),
            )
        delay = fault.latency_ms / 1000 if fault is not None else 0.0
        if routes.mirror and self._shadow is not None and decision.reason in _MIRRORED:
            # The shadow report compares like with like: a run of this request alone (plus any injected
            # delay), as the shadow times a copy alone; a batched run is not one, so it is left untimed.
            seconds = run_seconds + delay if shared == 1 else math.nan
            self._mirror(routes, decision, request, call.request_id, outputs, seconds, call.span)
        return InferResult(
            request_id=call.request_id,
            endpoint=routes.name,
            version=decision.version,
            arm=decision.arm,
            reason=decision.reason,
            route_revision=call.revision,
            outputs=outputs,
            delay_seconds=delay,
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

    def _measure(self, call: _Call, code: str, run_seconds: float = 0.0, shared: int = 0) -> None:
        seconds = time.perf_counter() - call.started
        self._telemetry.record(
            call.series, call.decision.arm, code, seconds, call.rows, call.nan, call.features, run_seconds, shared
        )
        if call.span is not None:
            call.span.attributes["gateway.batch_size"] = call.rows

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
