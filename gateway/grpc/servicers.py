"""Thin servicers: convert, call the domain service, convert back. No domain logic here.

RPCs that only compute are plain functions; `guard_servicer` runs them inside the one
coroutine gRPC needs, with the error mapping around them.
"""

from __future__ import annotations

from gateway.feedback import FeedbackJoin
from gateway.grpc import converters
from gateway.grpc.errors import CURRENT_SPAN, PENDING_DELAY
from gateway.inference import InferenceService, InferResult
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from gateway.pb.inference import grpc_service_pb2 as oip
from gateway.pb.inference import grpc_service_pb2_grpc as oip_grpc

TRACE_ID_PARAMETER = "trace_id"


def _delay(result: InferResult) -> InferResult:
    """Hand an injected delay (a fault drill) to the guard, which waits without blocking the loop."""
    if result.delay_seconds:
        PENDING_DELAY.set(result.delay_seconds)
    return result


class PredictServicer(gw_grpc.InferenceServicer):
    """`gateway.v1.Inference`."""

    def __init__(self, service: InferenceService, feedback: FeedbackJoin | None = None) -> None:
        self._infer = service.infer
        self._feedback = feedback

    def Predict(self, request: gw.PredictRequest, context: object) -> gw.PredictResponse:
        return converters.predict_response(_delay(self._infer(converters.predict_request(request), CURRENT_SPAN.get())))

    def Feedback(self, request: gw.FeedbackRequest, context: object) -> gw.FeedbackResponse:
        if self._feedback is None:
            return gw.FeedbackResponse(joined=False)
        joined = self._feedback.feedback(request.request_id, request.outcome)
        return gw.FeedbackResponse(joined=joined.joined, model=joined.endpoint, version=joined.version, arm=joined.arm)


class OpenInferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService`: the Open Inference Protocol v2."""

    def __init__(self, service: InferenceService) -> None:
        self._service = service
        self._infer = service.infer

    def ModelInfer(self, request: oip.ModelInferRequest, context: object) -> oip.ModelInferResponse:
        result = _delay(self._infer(converters.model_infer_request(request), CURRENT_SPAN.get()))
        return converters.model_infer_response(result)

    def ServerLive(self, request: oip.ServerLiveRequest, context: object) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: object) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._service.server_ready())

    def ModelReady(self, request: oip.ModelReadyRequest, context: object) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self._service.is_ready(request.name, request.version))

    def ServerMetadata(self, request: oip.ServerMetadataRequest, context: object) -> oip.ServerMetadataResponse:
        name, version, extensions = self._service.server_metadata()
        return oip.ServerMetadataResponse(name=name, version=version, extensions=list(extensions))

    def ModelMetadata(self, request: oip.ModelMetadataRequest, context: object) -> oip.ModelMetadataResponse:
        return converters.model_metadata_response(self._service.endpoint_metadata(request.name, request.version))


def stamp_predict(response: gw.PredictResponse, trace_id: str) -> None:
    """Put the trace id of a traced Predict into its response."""
    response.trace_id = trace_id


def stamp_model_infer(response: oip.ModelInferResponse, trace_id: str) -> None:
    """Put the trace id of a traced ModelInfer into its response parameters (`trace_id`)."""
    response.parameters[TRACE_ID_PARAMETER].string_param = trace_id
