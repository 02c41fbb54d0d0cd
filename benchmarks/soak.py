"""Soak: a real `gateway serve` under bounded loopback load for minutes, with churn. Not part of `make test`.

python -m benchmarks.soak [--seconds 900] [--warmup 300] [--clients 8] [--max-rss-growth 10]

`--seconds` is the whole run, warm-up included. Bounded buffers fill during the first minutes
(the feedback join's 200,000 request ids take ~200 s at 1,000 requests/s, about 50 MB; the
shadow's 100,000 comparison records longer): a warm-up past that measures leaks, not fills.

- Load: `--clients` closed-loop client threads (each its own channel) call Predict with a
  routing key; 1% of requests are invalid (wrong shape) and must get INVALID_ARGUMENT.
- Churn: every 5 s an admin change (alternately a 50/50 split and a rollback to stable).
- Shadow: 1.14 mirrors 100% of live requests for the whole run.
- Measured on the gateway process (from /proc): resident memory, threads and open files
  after warm-up and at the end; every non-OK answer to a valid request is an error.

Prints one JSON object with a verdict (valid requests all OK, every invalid one
INVALID_ARGUMENT, RSS after warm-up grown by at most `--max-rss-growth` percent, threads and
open files unchanged, exit 0 on SIGTERM) and exits 1 when it fails; the figures go into
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import admin_pb2_grpc
from gateway.pb.gateway.v1 import inference_pb2 as gw
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "soak-token-0123456789abcdef"


def _proc(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"rss_kib": rss, "threads": threads, "open_files": len(os.listdir(f"/proc/{pid}/fd"))}


def _start(store: Path) -> tuple[subprocess.Popen[str], str, str]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "serve", "--config", "models/gateway.yaml",
            "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--store", f"sqlite:///{store}",
            "--shadow-log-dir", str(store.parent / "shadow"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "GATEWAY_ADMIN_TOKENS": f"soak={TOKEN}"},
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"inference on (\S+), admin on (\S+) ", line)
    if match is None:
        process.kill()
        raise SystemExit(f"gateway did not start: {line!r}")
    return process, match.group(1), match.group(2)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--warmup", type=float, default=300.0)
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, after the warm-up")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--churn-seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        process, target, admin_target = _start(Path(scratch) / "soak.db")
        admin_channel = grpc.insecure_channel(admin_target)
        admin = admin_pb2_grpc.AdminStub(admin_channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        admin.SetShadow(
            pb.SetShadowRequest(endpoint="ctr-ranker", version="1.14", percent=100, reason="soak"),
            metadata=metadata,
            timeout=30,
        )
        stop = threading.Event()
        valid: Counter[str] = Counter()
        invalid: Counter[str] = Counter()
        lock = threading.Lock()
        rows = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)

        def client(index: int) -> None:
            channel = grpc.insecure_channel(target)
            stub = gw_grpc.InferenceStub(channel)
            rng = np.random.default_rng(index)
            n = 0
            while not stop.is_set():
                n += 1
                bad = rng.random() < 0.01
                data = rows[n % 64].tobytes()
                shape = [1, 31] if bad else [1, 32]
                request = gw.PredictRequest(
                    model="ctr-ranker",
                    routing_key=f"user-{index}-{n % 1000}",
                    inputs=[gw.Tensor(name="features", datatype=gw.DATA_TYPE_FP32, shape=shape, data=data)],
                )
                try:
                    stub.Predict(request, timeout=10)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with lock:
                    (invalid if bad else valid)[code] += 1
            channel.close()

        def churn() -> None:
            flip = False
            while not stop.wait(args.churn_seconds):
                flip = not flip
                try:
                    if flip:
                        admin.SetTraffic(
                            pb.SetTrafficRequest(
                                endpoint="ctr-ranker", weights={"1.12": 50, "1.13": 50}, reason="soak ramp"
                            ),
                            metadata=metadata,
                            timeout=30,
                        )
                    else:
                        admin.Rollback(
                            pb.RollbackRequest(endpoint="ctr-ranker", reason="soak rollback"),
                            metadata=metadata,
                            timeout=30,
                        )
                    with lock:
                        valid["changes"] += 1
                except grpc.RpcError as err:
                    with lock:
                        valid[f"change {err.code().name}"] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=churn))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(args.warmup)
        warm = _proc(process.pid)
        samples = [warm]
        while time.monotonic() - started < args.seconds:
            time.sleep(min(30.0, max(0.0, args.seconds - (time.monotonic() - started))))
            samples.append(_proc(process.pid))
        end = samples[-1]
        stop.set()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        revision = admin.GetRoutes(pb.GetRoutesRequest(), metadata=metadata, timeout=30).revision
        admin_channel.close()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(60)
    requests = sum(v for k, v in valid.items() if not k.startswith("change")) + sum(invalid.values())
    result = {
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "requests": requests,
        "requests_per_second": round(requests / elapsed, 1),
        "valid": dict(valid),
        "invalid": dict(invalid),
        "route_revision_at_end": revision,
        "warm": warm,
        "end": end,
        "rss_growth_after_warmup_pct": round(100 * (end["rss_kib"] - warm["rss_kib"]) / warm["rss_kib"], 2),
        "max_rss_kib": max(s["rss_kib"] for s in samples),
        "rss_kib_every_30s_after_warmup": [s["rss_kib"] for s in samples],
        "threads_growth": end["threads"] - warm["threads"],
        "open_files_growth": end["open_files"] - warm["open_files"],
        "exit_code": exit_code,
    }
    failures = _verdict(result, args.max_rss_growth)
    result["verdict"] = "pass" if not failures else "fail: " + "; ".join(failures)
    print(json.dumps(result, indent=2))
    if failures:
        sys.exit(1)


def _verdict(result: dict[str, Any], max_rss_growth: float) -> list[str]:
    """What the run shows to be wrong (empty: it passed)."""
    answers = {code: n for code, n in result["valid"].items() if code not in ("OK", "changes")}
    failures = [f"valid requests or changes answered {code}: {n}" for code, n in answers.items()]
    failures += [
        f"invalid requests answered {code}: {n}" for code, n in result["invalid"].items() if code != "INVALID_ARGUMENT"
    ]
    if result["rss_growth_after_warmup_pct"] > max_rss_growth:
        failures.append(
            f"RSS grew {result['rss_growth_after_warmup_pct']}% after the warm-up (limit {max_rss_growth}%)"
        )
    if result["threads_growth"] or result["open_files_growth"]:
        failures.append(f"threads {result['threads_growth']:+d}, open files {result['open_files_growth']:+d}")
    if result["exit_code"] != 0:
        failures.append(f"exit code {result['exit_code']} after SIGTERM")
    return failures


if __name__ == "__main__":
    main()
