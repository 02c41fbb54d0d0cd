"""Model runs on the event loop or on the runner pool: by measured cost, by setting, in parallel, on time."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import numpy as np
import pytest

from gateway.admission import Admission
from gateway.batcher import _Entry, run_batch
from gateway.errors import DeadlineExceeded, InvalidInput, NotReady
from gateway.runner import ModelRunner, RunnerSettings
from gateway.runtime import OnnxModel, RunCost
from testkit.gateways import MODELS, config_text, features, running_gateway, scores
from tests.test_batching import observed_runs, send, wait_for
from tests.test_grpc_predict import direct


def demo_model() -> OnnxModel:
    model = OnnxModel((MODELS / "ctr-ranker" / "1.12" / "model.onnx").read_bytes(), source="ctr-ranker 1.12")
    model.warm_up()
    return model


def test_warm_up_measures_the_run_cost_and_the_log_says_where_runs_go(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway"), running_gateway() as gw:
        model = gw.gateway.registry.runnable("ctr-ranker", "1.12")
        assert model.cost.first_row_seconds > 0
        assert model.batchable
    decisions = [r.getMessage() for r in caplog.records if "inline limit" in r.getMessage()]
    assert any(m.startswith("ctr-ranker 1.12: ") and "us per batch-1 run" in m for m in decisions), decisions


def test_a_run_handed_to_a_stopped_runner_is_unavailable_not_internal() -> None:
    runner = ModelRunner(RunnerSettings(threads=1))
    with pytest.raises(NotReady, match="not running models"):
        runner.run(print)
    runner.start()
    pool = runner._pool
    runner.shutdown()
    runner._pool = pool  # a request that read the pool just before the shutdown
    with pytest.raises(NotReady, match="shutting down"):
        runner.run(print)


def test_off_loop_by_measured_cost_rows_and_setting() -> None:
    model = demo_model()
    runner = ModelRunner(RunnerSettings(threads=2, inline_max_seconds=100e-6))
    assert not runner.off_loop(model, 1, "pool")  # not started: everything inline
    runner.start()
    try:
        model.cost = RunCost(first_row_seconds=10e-6, per_row_seconds=2e-6)
        assert not runner.off_loop(model, 1, "auto")
        assert not runner.off_loop(model, 46, "auto")  # 10 + 45 x 2 = 100 us: at the limit
        assert runner.off_loop(model, 47, "auto")
        assert runner.off_loop(model, 1, "pool")
        assert not runner.off_loop(model, 1000, "inline")
        model.cost = RunCost(first_row_seconds=300e-6)
        assert runner.off_loop(model, 1, "auto")
        assert "above the 100 us inline limit: runs go to the runner pool (2 threads)" in runner.describe(
            "ctr-ranker", "1.12", model
        )
    finally:
        runner.shutdown()
    with pytest.raises(InvalidInput, match="runner threads -1"):
        RunnerSettings(threads=-1)


def test_costly_runs_leave_the_event_loop_and_cheap_ones_stay() -> None:
    with running_gateway() as gw, observed_runs(gw.gateway, "1.12") as runs:
        x = features(2, seed=1)
        np.testing.assert_allclose(scores(send(gw, "ctr-ranker@1.12", x).result()), direct("1.12", x), rtol=1e-6)
    assert [(rows, name.startswith("runner")) for rows, name in runs] == [(2, False)]  # microseconds: inline
    with running_gateway(settings={"inline_run_max_us": 0}) as gw, observed_runs(gw.gateway, "1.12") as runs:
        x = features(3, seed=2)
        response = send(gw, "ctr-ranker@1.12", x).result()
        np.testing.assert_allclose(scores(response), direct("1.12", x), rtol=1e-6)
    assert [(rows, name.startswith("runner")) for rows, name in runs] == [(3, True)]


def test_runs_proceed_at_once_on_several_runner_threads() -> None:
    both_running = threading.Barrier(2, timeout=15)
    text = config_text(runner="pool")
    with running_gateway(text, settings={"runner_threads": 2}) as gw:
        model = gw.gateway.registry.runnable("ctr-ranker", "1.12")
        original = model.run

        def run(feeds, output_names=()):  # type: ignore[no-untyped-def]
            both_running.wait()  # passes only when two runs are in progress at the same time
            return original(feeds, output_names)

        model.run = run  # type: ignore[method-assign]
        calls = [send(gw, "ctr-ranker@1.12", features(1, seed=i)) for i in range(2)]
        assert [c.result().version for c in calls] == ["1.12", "1.12"]
        del model.run


def test_a_queued_run_whose_deadline_passed_is_not_started() -> None:
    release = threading.Event()
    text = config_text(runner="pool")
    with running_gateway(text, settings={"runner_threads": 1}) as gw:
        model = gw.gateway.registry.runnable("ctr-ranker", "1.12")
        original = model.run
        started: list[int] = []

        def run(feeds, output_names=()):  # type: ignore[no-untyped-def]
            started.append(feeds["features"].shape[0])
            if len(started) == 1:
                release.wait(15)  # the one runner thread is busy until the late request has expired
            return original(feeds, output_names)

        model.run = run  # type: ignore[method-assign]
        busy = send(gw, "ctr-ranker@1.12", features(1, seed=1))
        wait_for(lambda: started == [1], "the runner thread to be busy")
        with pytest.raises(grpc.RpcError) as expired:
            send(gw, "ctr-ranker@1.12", features(2, seed=2), timeout=0.3).result()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert busy.result().version == "1.12"
        assert send(gw, "ctr-ranker@1.12", features(3, seed=3)).result().version == "1.12"  # queued after it
        del model.run
    assert started == [1, 3]


def test_a_batch_entry_past_its_deadline_or_abandoned_is_not_run_and_every_slot_is_given_back() -> None:
    model = demo_model()
    admission = Admission(8)

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [
            _Entry(
                {"features": features(rows, seed=i)},
                ("score",),
                rows,
                admission.admit("ctr-ranker", "1.12"),
                deadline,
                loop.create_future(),
            )
            for i, (rows, deadline) in enumerate([(1, now - 1), (2, None), (1, None)])
        ]
        entries[2].future.cancel()
        results = run_batch(model, entries, admission.left)
        alone = results[1]
        assert not isinstance(alone, BaseException) and alone[1] == 1 and alone[2] > 0  # one live request: alone
        for entry in entries:
            entry.slot.release()
        return [r if isinstance(r, BaseException) else r[0] for r in results]

    expired, served, abandoned = asyncio.run(scenario())
    assert isinstance(expired, DeadlineExceeded) and "deadline passed" in expired.message
    assert isinstance(abandoned, DeadlineExceeded)
    np.testing.assert_allclose(served[0], direct("1.12", features(2, seed=1)), rtol=1e-6)  # type: ignore[index]
    assert admission.in_flight("ctr-ranker", "1.12") == 0
