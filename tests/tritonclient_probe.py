"""Run an unmodified tritonclient.grpc client against a gateway; print what it saw as JSON.

Usage: python tritonclient_probe.py HOST:PORT
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main(target: str) -> None:
    client = triton.InferenceServerClient(url=target)
    x = np.random.default_rng(5).normal(size=(3, 32)).astype(np.float32)
    results = {}
    for version in ("1.12", "1.13", "1.14"):
        inp = triton.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = triton.InferRequestedOutput("score")
        result = client.infer("ctr-ranker", [inp], model_version=version, outputs=[out])
        assert result.get_response().model_version == version
        results[version] = result.as_numpy("score").tolist()
    inp = triton.InferInput("features", [1, 32], "FP32")
    inp.set_data_from_numpy(x[:1])
    sticky = client.infer("ctr-ranker", [inp], parameters={"routing_key": "user-7"})
    metadata = client.get_model_metadata("ctr-ranker", as_json=True)
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("ctr-ranker"),
                "metadata": {"inputs": metadata["inputs"]},
                "features": x.tolist(),
                "results": results,
                "sticky_version": sticky.get_response().model_version,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
