"""The baseline: a bare grpc.aio server that only runs onnxruntime on one model file.

It speaks gateway.v1.Inference/Predict (so the same client drives both servers) and does
the least a server can: decode the tensor, run the session, encode the output.
Usage: python -m benchmarks.bare_server MODEL.onnx  (prints "ready PORT")
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import numpy as np
import onnxruntime as ort

from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc


class Bare(gw_grpc.InferenceServicer):
    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])

    async def Predict(self, request: gw.PredictRequest, context: grpc.aio.ServicerContext) -> gw.PredictResponse:
        tensor = request.inputs[0]
        x = np.frombuffer(tensor.data, dtype=np.float32).reshape(tensor.shape)
        (score,) = self.session.run(["score"], {"features": x})
        response = gw.PredictResponse(request_id=request.request_id, model=request.model, version="bare")
        response.outputs.add(name="score", datatype=gw.DATA_TYPE_FP32, shape=score.shape, data=score.tobytes())
        return response

    async def Feedback(self, request: gw.FeedbackRequest, context: grpc.aio.ServicerContext) -> gw.FeedbackResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bare server serves Predict only")
        raise AssertionError("abort raises")


async def main(path: str) -> None:
    server = grpc.aio.server()
    gw_grpc.add_InferenceServicer_to_server(Bare(path), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"ready {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
