"""The baselines: bare servers that only run onnxruntime on one model file.

They speak gateway.v1.Inference/Predict (so the same client drives every server) and do the
least a server can: decode the tensor, run the session, encode the output.

- default: a grpc.aio server, the model run inline on its event loop;
- `--threads N`: a classic thread-pool gRPC server with N handler threads (onnxruntime
  releases the GIL, so runs proceed on several cores at once).

Usage: python -m benchmarks.bare_server MODEL.onnx [--threads N]  (prints "ready PORT")
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent import futures

import grpc
import numpy as np
import onnxruntime as ort

from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc


def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def _predict(session: ort.InferenceSession, request: gw.PredictRequest) -> gw.PredictResponse:
    tensor = request.inputs[0]
    x = np.frombuffer(tensor.data, dtype=np.float32).reshape(tensor.shape)
    (score,) = session.run(["score"], {"features": x})
    response = gw.PredictResponse(request_id=request.request_id, model=request.model, version="bare")
    response.outputs.add(name="score", datatype=gw.DATA_TYPE_FP32, shape=score.shape, data=score.tobytes())
    return response


class Bare(gw_grpc.InferenceServicer):
    def __init__(self, path: str) -> None:
        self.session = _session(path)

    async def Predict(self, request: gw.PredictRequest, context: grpc.aio.ServicerContext) -> gw.PredictResponse:
        return _predict(self.session, request)

    async def Feedback(self, request: gw.FeedbackRequest, context: grpc.aio.ServicerContext) -> gw.FeedbackResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bare server serves Predict only")
        raise AssertionError("abort raises")


class BareThreaded(gw_grpc.InferenceServicer):
    def __init__(self, path: str) -> None:
        self.session = _session(path)

    def Predict(self, request: gw.PredictRequest, context: grpc.ServicerContext) -> gw.PredictResponse:
        return _predict(self.session, request)

    def Feedback(self, request: gw.FeedbackRequest, context: grpc.ServicerContext) -> gw.FeedbackResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the bare server serves Predict only")
        raise AssertionError("abort raises")
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


def main_threaded(path: str, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    gw_grpc.add_InferenceServicer_to_server(BareThreaded(path), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ready {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=0, help="thread-pool server with N threads (default: aio)")
    args = parser.parse_args()
    if args.threads:
        main_threaded(args.model, args.threads)
    else:
        asyncio.run(main(args.model))
