"""A model load while serving: how long Predict stalls, and the gateway's peak memory (issue 11, item 3).

python -m benchmarks.model_load [--mib 256] [--rounds 2] [--tree DIR ...]

Builds a valid ONNX model of about `--mib` MiB (one large initializer) beside a copy of the
demo endpoint, starts `gateway serve` on it, keeps one closed-loop Predict client going, and
loads the big model with LoadVersion. Reports Predict latency before and during the load and
the process's peak resident memory (VmHWM). `--tree` runs the same against other source trees
(e.g. `git archive <commit>` of an earlier version), side by side in one run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789abcdef"


def _big_model(path: Path, mib: int) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    columns = mib * (1 << 20) // (4 * 32)
    weights = np.random.default_rng(0).random((32, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["y"]), helper.make_node("ReduceMean", ["y"], ["score"])],
        "big",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hwm(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024  # type: ignore[union-attr]


def _measure(tree: Path, scratch: Path, digest: str) -> dict[str, float]:
    config = scratch / "gateway.yaml"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "serve", "--config", str(config),
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
            "--store", f"sqlite:///{tempfile.mkdtemp(dir=scratch)}/state.db", "--shadow-log-dir", "",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tree,
        env={**os.environ, "GATEWAY_ADMIN_TOKENS": f"bench={TOKEN}", "PYTHONPATH": str(tree)},
    )  # fmt: skip
    assert process.stdout is not None
    match = re.search(r"inference on (\S+), admin on (\S+) ", process.stdout.readline())
    assert match, "gateway did not start"
    before_load = _hwm(process.pid)
    latencies: list[tuple[float, float]] = []
    stop = threading.Event()
    request = gw.PredictRequest(
        model="ctr-ranker@1.12",
        inputs=[gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=[1, 32], data=bytes(128))],
    )

    def client() -> None:
        with grpc.insecure_channel(match.group(1)) as channel:
            stub = gw_grpc.InferenceStub(channel)
            while not stop.is_set():
                started = time.perf_counter()
                stub.Predict(request, timeout=30)
                latencies.append((started, time.perf_counter() - started))

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(3)
    load_started = time.perf_counter()
    with grpc.insecure_channel(match.group(2)) as channel:
        admin_pb2_grpc.AdminStub(channel).LoadVersion(
            pb.LoadVersionRequest(endpoint="ctr-ranker", version="9.0", path="big.onnx", sha256=digest, reason="bench"),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=600,
        )
    load_ended = time.perf_counter()
    time.sleep(1)
    stop.set()
    thread.join()
    peak = _hwm(process.pid)
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    baseline = sorted(s for t, s in latencies if t < load_started)
    during = sorted(s for t, s in latencies if load_started <= t + s and t <= load_ended)
    return {
        "load_s": load_ended - load_started,
        "baseline_p99_ms": 1000 * baseline[int(0.99 * (len(baseline) - 1))],
        "during_max_ms": 1000 * max(during) if during else float("nan"),
        "during_requests": len(during),
        "rss_before_load_mib": before_load,
        "peak_rss_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_load")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another source tree to compare")
    args = parser.parse_args()
    trees = [ROOT, *args.tree]
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        shutil.copytree(ROOT / "models" / "ctr-ranker", scratch / "ctr-ranker")
        digest = _big_model(scratch / "big.onnx", args.mib)
        (scratch / "gateway.yaml").write_text(
            (ROOT / "models" / "gateway.yaml").read_text().replace("model_root: .", f"model_root: {scratch}")
        )
        print(f"model {(scratch / 'big.onnx').stat().st_size / (1 << 20):.0f} MiB; {os.cpu_count()} cores")
        print(
            "| tree | round | load s | Predict p99 before ms | Predict max during load ms | RSS before MiB "
            "| peak RSS MiB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for round_ in range(args.rounds):
            for tree in trees:
                r = _measure(tree, scratch, digest)
                print(
                    f"| {tree.name if tree != ROOT else 'this tree'} | {round_ + 1} | {r['load_s']:.2f} | "
                    f"{r['baseline_p99_ms']:.2f} | {r['during_max_ms']:.1f} | {r['rss_before_load_mib']} | "
                    f"{r['peak_rss_mib']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
