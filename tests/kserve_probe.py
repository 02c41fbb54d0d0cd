"""Run KServe's own gRPC client (kserve.InferenceGRPCClient) against a gateway; print what it saw as JSON.

Usage: python kserve_probe.py HOST:PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(target: str) -> None:
    client = InferenceGRPCClient(url=target, timeout=10)
    x = np.random.default_rng(3).normal(size=(2, 32)).astype(np.float32)
    features = InferInput("features", list(x.shape), "FP32")
    features.set_data_from_numpy(x, binary_data=True)
    response = await client.infer(InferRequest(model_name="ctr-ranker", infer_inputs=[features], model_version="1.13"))
    live = await client.is_server_live()
    await client.close()
    print(json.dumps({"live": live, "version": response.model_version, "features": x.tolist(),
                      "score": response.outputs[0].as_numpy().tolist()}))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
