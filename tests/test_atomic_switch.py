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
    """32 concurrent callers on an aio channel in their own thread; records (start, end, version) per call.

    `wait_for_requests_since(t, n)` blocks until `n` calls that started after `t` have finished,
    so the test waits for evidence, not for a guessed amount of time.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.records: list[tuple[float, float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._finished = threading.Condition()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
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
                        with self._finished:
                            self.records.append((started, time.monotonic(), response.version))
                            self._finished.notify_all()
                    except grpc.aio.AioRpcError as err:
                        self.errors.append(f"{err.code().name}: {err.details()}")
                    i += CLIENTS

            await asyncio.gather(*(caller(i) for i in range(CLIENTS)))

    def wait_for_requests_since(self, since: float, count: int) -> None:
        seen = len(self.records)
        newer = 0

        def enough() -> bool:
            nonlocal seen, newer
            newer += sum(started > since for started, _, _ in self.records[seen:])
            seen = len(self.records)
            return newer >= count or bool(self.errors)

        with self._finished:
            assert self._finished.wait_for(enough, timeout=60), "the load stopped making requests"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_200_changes_under_load_fail_nothing_and_rollbacks_take_effect_at_once() -> None:
    rng = random.Random(7)
    with running_gateway() as gw:
        load = Load(gw.target)
        load.start()
        load.wait_for_requests_since(0.0, CLIENTS)
        windows: list[tuple[float, float]] = []  # (rollback returned, next change issued)
        for i in range(CHANGES):
            if i % 2 == 0:
                canary = rng.choice(["1.13", "1.14"])
                share = rng.choice([5, 25, 50, 75, 100])
                weights = {"1.12": 100 - share, canary: share} if share < 100 else {canary: 100}
                gw.admin(
                    "SetTraffic",
                    pb.SetTrafficRequest(endpoint="ctr-ranker", weights=weights, reason=f"step {i}"),
                )
                continue
            gw.admin("Rollback", pb.RollbackRequest(endpoint="ctr-ranker", reason=f"step {i}"))
            returned = time.monotonic()
            # Whole requests start and finish between this rollback and the next change.
            load.wait_for_requests_since(returned, CLIENTS)
            windows.append((returned, time.monotonic()))
        load.stop()
        assert gw.gateway.router.table.revision == 1 + CHANGES

    assert load.errors == []
    # A request counts for a window when it started after the rollback returned and finished
    # before the next change was issued: nothing but the rollback can have routed it.
    for start, end in windows:
        served = [version for started, finished, version in load.records if start < started and finished < end]
        assert len(served) >= CLIENTS
        assert set(served) == {"1.12"}, f"a request after a rollback was served by {set(served)}"
