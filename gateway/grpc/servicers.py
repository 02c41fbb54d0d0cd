"""Thin servicers: convert, call the domain service, convert back. No domain logic here.

RPCs that only compute are plain functions; `guard_servicer` runs them inside the one
coroutine gRPC needs, with the error mapping around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeAlias, TypeVar

from gateway.control import ControlPlane
from gateway.errors import FailedPrecondition, InvalidInput, NotFound
from gateway.feedback import FeedbackJoin
from gateway.grpc import converters
from gateway.grpc import oip_extensions as extensions
from gateway.grpc.errors import CURRENT_SPAN, ON_ABANDON, PENDING_DELAY
from gateway.inference import InferenceService, InferResult
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.telemetry.metrics import Telemetry

TRACE_ID_PARAMETER = "trace_id"
#: The protocol extensions this servicer answers (Triton's names for them).
EXTENSIONS = ("model_configuration", "model_repository", "statistics")
#: The audit log's reason for repository changes made without a `reason` parameter.
REPOSITORY_REASON = "RepositoryModelLoad/Unload over the Open Inference Protocol"


R = TypeVar("R")
S = TypeVar("S")
#: What an inference RPC's behavior returns: the response, or (the request waits for a batch or a
#: runner thread) a coroutine that gives it; the guard awaits the latter.
Answer: TypeAlias = R | Coroutine[Any, Any, R]


class Context(Protocol):
    """What the inference RPCs use of a gRPC servicer context."""

    def time_remaining(self) -> float | None:
        """Seconds before the caller's deadline (None without one)."""
        ...


async def _answer(
    pending: Coroutine[Any, Any, InferResult], service: InferenceService, convert: Callable[[InferResult], R]
) -> R:
    return convert(_delay(await pending, service))


async def _then(pending: Coroutine[Any, Any, R], convert: Callable[[R], S]) -> S:
    return convert(await pending)


def _delay(result: InferResult, service: InferenceService) -> InferResult:
    """Hand an injected delay (a fault drill) to the guard, which waits without blocking the loop.

    A caller that leaves during the wait (its deadline, or a cancellation) is a timeout of the version.
    """
    if result.delay_seconds:
        PENDING_DELAY.set(result.delay_seconds)
        ON_ABANDON.set(lambda: service.abandoned(result))
    return result


class PredictServicer(gw_grpc.InferenceServicer):
    """`gateway.v1.Inference`."""

    def __init__(self, service: InferenceService, feedback: FeedbackJoin | None = None) -> None:
        self._service = service
        self._infer = service.serve
        self._feedback = feedback

    def Predict(self, request: gw.PredictRequest, context: Context) -> Answer[gw.PredictResponse]:
        result = self._infer(converters.predict_request(request), CURRENT_SPAN.get(), context.time_remaining)
        if isinstance(result, InferResult):  # run inline: no coroutine on the hot path
            return converters.predict_response(_delay(result, self._service))
        return _answer(result, self._service, converters.predict_response)

    def Feedback(self, request: gw.FeedbackRequest, context: object) -> gw.FeedbackResponse:
        if self._feedback is None:
            return gw.FeedbackResponse(joined=False, result=gw.FEEDBACK_RESULT_UNKNOWN)
        value = request.value if request.HasField("value") else None
        joined = self._feedback.feedback(request.request_id, request.outcome, value, feedback_id=request.feedback_id)
        return converters.feedback_response(joined)


class OpenInferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`: the Open Inference Protocol v2 and Triton's extensions.

    Repository load and unload are admin operations: `authenticate` reads the caller's admin
    bearer token from the call's metadata (raising when it is missing or wrong) and the
    control plane does the change, audited under that name.
    """

    def __init__(
        self,
        service: InferenceService,
        control: ControlPlane,
        telemetry: Telemetry,
        authenticate: Callable[[Any], str],
        server_name: str = "",
    ) -> None:
        self._service = service
        self._server_name = server_name
        self._infer = service.serve
        self._control = control
        self._telemetry = telemetry
        self._authenticate = authenticate

    def ModelInfer(self, request: oip.ModelInferRequest, context: Context) -> Answer[oip.ModelInferResponse]:
        result = self._infer(converters.model_infer_request(request), CURRENT_SPAN.get(), context.time_remaining)
        if isinstance(result, InferResult):
            return converters.model_infer_response(_delay(result, self._service))
        return _answer(result, self._service, converters.model_infer_response)

    def ModelStreamInfer(  # type: ignore[override]  # per message: guard_stream iterates the stream
        self, request: oip.ModelInferRequest, context: Context
    ) -> Answer[oip.ModelStreamInferResponse]:
        """One message of the stream (the guard iterates the stream and sends errors in-band)."""
        response = self.ModelInfer(request, context)
        if isinstance(response, oip.ModelInferResponse):
            return extensions.stream_reply(response)
        return _then(response, extensions.stream_reply)

    def ModelConfig(self, request: oip.ModelConfigRequest, context: object) -> oip.ModelConfigResponse:
        metadata = self._service.endpoint_metadata(self._known(request.name), request.version)
        return extensions.model_config_response(metadata)

    def ModelStatistics(self, request: oip.ModelStatisticsRequest, context: object) -> oip.ModelStatisticsResponse:
        versions = self._control.versions(self._known(request.name) if request.name else "")
        if request.version:
            versions = [v for v in versions if v.version == request.version]
            if not versions:
                self._service.endpoint_metadata(request.name, request.version)  # NotFound naming the versions
        return extensions.model_statistics_response(versions, self._telemetry.version_totals())

    def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: object) -> oip.RepositoryIndexResponse:
        return extensions.repository_index_response(self._control.versions(), request.ready)

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: object
    ) -> oip.RepositoryModelLoadResponse:
        actor = self._authenticate(context)
        name = request.model_name
        params = extensions.repository_parameters(name, request.parameters)
        reason = params.get("reason") or REPOSITORY_REASON
        if "version" not in params:
            self._require_loaded(name)
        else:
            missing = [k for k in ("path", "sha256") if not params.get(k)]
            if missing:
                raise InvalidInput(f"failed to load {name!r} {params['version']}: give {' and '.join(missing)} too")
            # Reading, hashing and warming a model blocks: off the serving loop.
            await asyncio.to_thread(
                self._control.load_version,
                actor,
                name,
                params["version"],
                params["path"],
                params["sha256"],
                reason=reason,
            )
        return oip.RepositoryModelLoadResponse()

    def _require_loaded(self, name: str) -> None:
        """Load without a version: Triton's "load or reload"; the gateway's versions are loaded already."""
        if name not in self._control.state.endpoints:
            raise NotFound(
                f"failed to load {name!r}: no endpoint {name!r}; served endpoints: "
                f"{', '.join(sorted(self._control.state.endpoints)) or '(none)'}. To add a version, "
                "pass the string parameters version, path and sha256"
            )
        waiting = [f"{v.version} ({v.state})" for v in self._control.versions(name) if v.state != "ready"]
        if waiting:
            raise FailedPrecondition(f"failed to load {name!r}: versions not ready: {', '.join(waiting)}")

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: object
    ) -> oip.RepositoryModelUnloadResponse:
        actor = self._authenticate(context)
        name = request.model_name
        params = extensions.repository_parameters(name, request.parameters, ("version", "reason"))
        if not params.get("version"):
            versions = ", ".join(v.version for v in self._control.versions(name))
            raise InvalidInput(
                f"failed to unload {name!r}: name the version with the string parameter 'version' "
                f"(versions: {versions}); an endpoint that takes traffic is never unloaded whole"
            )
        await asyncio.to_thread(
            self._control.unload_version,
            actor,
            name,
            params["version"],
            reason=params.get("reason") or REPOSITORY_REASON,
        )
        return oip.RepositoryModelUnloadResponse()

    def ServerLive(self, request: oip.ServerLiveRequest, context: object) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: object) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._service.server_ready())

    def ModelReady(self, request: oip.ModelReadyRequest, context: object) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self._service.is_ready(request.name, request.version))

    def ServerMetadata(self, request: oip.ServerMetadataRequest, context: object) -> oip.ServerMetadataResponse:
        name, version, extensions = self._service.server_metadata()
        return oip.ServerMetadataResponse(
            name=self._server_name or name, version=version, extensions=[*extensions, *EXTENSIONS]
        )

    def _known(self, name: str) -> str:
        """An endpoint a model call names, or NotFound in the words Triton's clients look for."""
        endpoints = self._service.endpoints()
        if name not in endpoints:
            served = ", ".join(endpoints) or "(none)"
            raise NotFound(f"Request for unknown model: {name!r} is not found; served endpoints: {served}")
        return name

    def ModelMetadata(self, request: oip.ModelMetadataRequest, context: object) -> oip.ModelMetadataResponse:
        metadata = self._service.endpoint_metadata(self._known(request.name), request.version)
        return converters.model_metadata_response(metadata)


def stamp_predict(response: gw.PredictResponse, trace_id: str) -> None:
    """Put the trace id of a traced Predict into its response."""
    response.trace_id = trace_id


def stamp_model_infer(response: oip.ModelInferResponse, trace_id: str) -> None:
    """Put the trace id of a traced ModelInfer into its response parameters (`trace_id`)."""
    response.parameters[TRACE_ID_PARAMETER].string_param = trace_id
