"""Route changes under load: no failed request, and a rollback is visible to the very next request."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import pytest

from gateway.pb.gateway.v1 import admin_pb2 as pb
from gateway.pb.gateway.v1 import inference_pb2_grpc as gw_grpc
from testkit.gateways import predict_request, running_gateway

CLIENTS = 32
CHANGES = 200


class Load:
    """32 concurrent callers on an aio channel in their own thread; records (start, end, version) per call."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.records: list[tuple[float, float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            predict = gw_grpc.InferenceStub(channel).Predict
            requests = [predict_request(routing_key=f"user-{i}") for i in range(500)]

            async def caller(index: int) -> None:
                i = index
                while not self._stop.is_set():
                    started = time.monotonic()
                    try:
                        response = await predict(requests[i % len(requests)], timeout=10)
                        self.records.append((started, time.monotonic(), response.version))
                    except grpc.aio.AioRpcError as err:
                        self.errors.append(f"{err.code().name}: {err.details()}")
                    i += CLIENTS

            await asyncio.gather(*(caller(i) for i in range(CLIENTS)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_200_changes_under_load_fail_nothing_and_rollbacks_take_effect_at_once() -> None:
    rng = random.Random(7)
    with running_gateway() as gw:
        load = Load(gw.target)
        time.sleep(0.5)
        windows: list[tuple[float, float]] = []  # (rollback returned, next change issued)
        rollback_returned = None
        for i in range(CHANGES):
            issued = time.monotonic()
            if rollback_returned is not None:
                windows.append((rollback_returned, issued))
                rollback_returned = None
            if i % 2 == 0:
                canary = rng.choice(["1.13", "1.14"])
                share = rng.choice([5, 25, 50, 75, 100])
                weights = {"1.12": 100 - share, canary: share} if share < 100 else {canary: 100}
                gw.admin(
                    "SetTraffic",
                    pb.SetTrafficRequest(endpoint="ctr-ranker", weights=weights, reason=f"step {i}"),
                )
            else:
                gw.admin("Rollback", pb.RollbackRequest(endpoint="ctr-ranker", reason=f"step {i}"))
                rollback_returned = time.monotonic()
                time.sleep(0.1)  # long enough for whole requests to start and finish in the window
        load.stop()
        assert gw.gateway.router.table.revision > CHANGES // 2

    assert load.errors == []
    assert len(load.records) > 1000
    checked = 0
    # A request counts for a window when it started after the rollback returned and finished
    # before the next change was issued: nothing but the rollback can have routed it.
    for start, end in windows:
        served = [version for started, finished, version in load.records if start < started and finished < end]
        checked += len(served)
        assert set(served) <= {"1.12"}, f"a request after a rollback was served by {set(served)}"
    assert checked > 100  # the windows did contain requests
