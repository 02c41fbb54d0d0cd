"""Adaptive batching through a real gateway: merging, splitting, isolation, failures, rollbacks, deadlines.

A request that finds its version idle runs at once, so the tests first occupy the version:
its runs go to the runner pool (`runner: pool`, three threads) and the first run is held
until the test lets it go. Requests sent meanwhile wait for batch-mates (up to 10 s), so a
batch runs exactly when it is full or reaches a preferred size: the tests assert on which
runs happened, never on time. Runs are observed (and, in one test, failed on purpose) by
wrapping the loaded model's `run`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from gateway.app import Gateway
from gateway.pb.gateway.v1 import admin_pb2 as admin
from gateway.telemetry.windows import SeriesKey
from testkit.gateways import RunningGateway, config_text, features, predict_request, running_gateway, scores, tensor
from tests.test_grpc_predict import direct

WAIT_FOR_FULL = "{max_batch_size: %d, max_delay_ms: 10000}"
#: A bound on waiting for a batch a trigger (full, preferred size) runs: under the 10 s delay, so a
#: trigger that fails is seen (grpc.FutureTimeoutError), not covered by the delay running it later.
TRIGGERED = 8.0


def batching_gateway(batching: str, **overrides: str) -> AbstractContextManager[RunningGateway]:
    """A gateway whose ctr-ranker batches with `batching` and runs on a pool of three runner threads."""
    return running_gateway(config_text(batching=batching, runner="pool", **overrides), settings={"runner_threads": 3})


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def pending(running: RunningGateway) -> int:
    return running.gateway.inference.batcher.pending()


class Runs(list[tuple[int, str]]):
    """(rows, thread name) of every run of a version, and the gate its first run waits at."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        #: The call that keeps the version busy (held here: a dropped call is cancelled by the client).
        self.busy: Any = None

    @property
    def rows(self) -> list[int]:
        return [rows for rows, _ in self]


@contextmanager
def observed_runs(
    gateway: Gateway,
    version: str,
    fail_when: Callable[[np.ndarray], bool] | None = None,
    *,
    hold_first: bool = False,
) -> Iterator[Runs]:
    """Every run of a version; `fail_when` fails runs over matching inputs; `hold_first` holds the
    first run until `runs.release` is set (always set on exit)."""
    model = gateway.registry.runnable("ctr-ranker", version)
    original = model.run
    runs = Runs()
    if not hold_first:
        runs.release.set()

    def run(feeds, output_names=()):  # type: ignore[no-untyped-def]
        x = feeds["features"]
        runs.append((x.shape[0], threading.current_thread().name))
        if len(runs) == 1:
            runs.release.wait(30)
        if fail_when is not None and fail_when(x):
            raise RuntimeError("injected model failure")
        return original(feeds, output_names)

    model.run = run  # type: ignore[method-assign]
    try:
        yield runs
    finally:
        runs.release.set()
        del model.run


def send(running: RunningGateway, model: str, x: np.ndarray, timeout: float = 30.0, **kwargs):  # type: ignore[no-untyped-def]
    request = predict_request(model, inputs=[tensor("features", x)], **kwargs)
    return running.predict_stub.Predict.future(request, timeout=timeout)


def occupy(running: RunningGateway, version: str, runs: Runs) -> Any:
    """Send a request that finds `version` idle and runs at once, held in its run: the version is busy."""
    runs.busy = send(running, f"ctr-ranker@{version}", features(1, seed=99))
    wait_for(lambda: len(runs) == 1, f"{version} to be busy")
    return runs.busy


def test_a_request_to_an_idle_version_runs_at_once() -> None:
    with batching_gateway(WAIT_FOR_FULL % 8) as gw, observed_runs(gw.gateway, "1.12") as runs:
        x = features(3, seed=5)
        np.testing.assert_allclose(scores(send(gw, "ctr-ranker@1.12", x).result()), direct("1.12", x), rtol=1e-6)
        assert runs.rows == [3]  # it did not wait 10 s for company


def test_requests_that_arrive_while_a_run_is_busy_share_one_run_and_each_gets_its_own_rows() -> None:
    with batching_gateway(WAIT_FOR_FULL % 6) as gw, observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
        busy = occupy(gw, "1.12", runs)
        inputs = [features(rows, seed=rows) for rows in (1, 2, 3)]
        calls = [send(gw, "ctr-ranker@1.12", x) for x in inputs]
        # Full at 6 rows: runs while the first is still held, long before its 10 s delay would run it.
        responses = [call.result(timeout=TRIGGERED) for call in calls]
        assert runs.rows == [1, 6]
        runs.release.set()
        assert busy.result().version == "1.12"
        totals = gw.gateway.telemetry.version_totals()[("ctr-ranker", "1.12")]
        assert (totals.success_count, round(totals.executions)) == (4, 2)  # ModelStatistics' execution_count
    for x, response in zip(inputs, responses, strict=True):
        assert response.version == "1.12"
        np.testing.assert_allclose(scores(response), direct("1.12", x), rtol=1e-6)
    assert len({r.request_id for r in responses}) == 3


def test_requests_for_different_versions_never_share_a_batch() -> None:
    with (
        batching_gateway(WAIT_FOR_FULL % 2) as gw,
        observed_runs(gw.gateway, "1.12", hold_first=True) as runs_12,
        observed_runs(gw.gateway, "1.14", hold_first=True) as runs_14,
    ):
        busy = [occupy(gw, "1.12", runs_12), occupy(gw, "1.14", runs_14)]
        inputs = {version: [features(1, seed=i) for i in range(2)] for version in ("1.12", "1.14")}
        calls = {v: [send(gw, f"ctr-ranker@{v}", x) for x in xs] for v, xs in inputs.items()}
        responses = {v: [c.result() for c in cs] for v, cs in calls.items()}
        assert (runs_12.rows, runs_14.rows) == ([1, 2], [1, 2])
        runs_12.release.set()
        runs_14.release.set()
        assert [b.result().version for b in busy] == ["1.12", "1.14"]
    for version, xs in inputs.items():
        for x, response in zip(xs, responses[version], strict=True):
            assert response.version == version
            np.testing.assert_allclose(scores(response), direct(version, x), rtol=1e-6)


def test_an_invalid_request_is_refused_before_it_joins_a_batch() -> None:
    with batching_gateway(WAIT_FOR_FULL % 2) as gw, observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
        occupy(gw, "1.12", runs)
        first = send(gw, "ctr-ranker@1.12", features(1, seed=1))
        wait_for(lambda: pending(gw) == 1, "the first request to wait for a batch-mate")
        with pytest.raises(grpc.RpcError) as bad:
            send(gw, "ctr-ranker@1.12", np.zeros((1, 31), np.float32)).result()
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected [-1, 32]" in bad.value.details()
        assert pending(gw) == 1
        second = send(gw, "ctr-ranker@1.12", features(1, seed=2))
        assert first.result().version == second.result().version == "1.12"
        assert runs.rows == [1, 2]


def test_a_failing_run_fails_only_the_request_that_fails_alone() -> None:
    poisoned = features(1, seed=9)
    poisoned[0, 0] = 999.0
    inputs = [features(1, seed=1), poisoned, features(2, seed=2)]
    fails = lambda x: bool((x[:, 0] == 999.0).any())  # noqa: E731
    with batching_gateway(WAIT_FOR_FULL % 4) as gw, observed_runs(gw.gateway, "1.12", fails, hold_first=True) as runs:
        occupy(gw, "1.12", runs)
        calls = [send(gw, "ctr-ranker@1.12", x) for x in inputs]
        good = [calls[0].result(), calls[2].result()]
        with pytest.raises(grpc.RpcError) as failed:
            calls[1].result()
        assert failed.value.code() == grpc.StatusCode.INTERNAL  # what it gets unbatched, too
        # The merged run failed, then each request ran alone.
        assert runs.rows == [1, 4, 1, 1, 2]
    for x, response in zip([inputs[0], inputs[2]], good, strict=True):
        np.testing.assert_allclose(scores(response), direct("1.12", x), rtol=1e-6)


def test_a_rollback_while_a_request_waits_changes_only_requests_routed_after_it() -> None:
    with (
        batching_gateway(WAIT_FOR_FULL % 2, traffic='{"1.13": 100}') as gw,
        observed_runs(gw.gateway, "1.13", hold_first=True) as runs,
    ):
        occupy(gw, "1.13", runs)
        before = send(gw, "ctr-ranker", features(1, seed=1))  # weighted: the canary, which is busy
        wait_for(lambda: pending(gw) == 1, "the request routed to the canary to wait")
        gw.admin("Rollback", admin.RollbackRequest(endpoint="ctr-ranker", reason="canary looks bad"))
        after = [send(gw, "ctr-ranker", features(1, seed=i)).result() for i in (2, 3)]
        assert [(r.version, r.route_revision) for r in after] == [("1.12", 2), ("1.12", 2)]
        assert not before.done()
        mate = send(gw, "ctr-ranker@1.13", features(1, seed=4))
        routed_before = before.result()
        assert (routed_before.version, routed_before.route_revision) == ("1.13", 1)
        assert mate.result().version == "1.13"
        assert runs.rows == [1, 2]


def test_a_request_whose_deadline_passes_while_it_waits_is_not_run() -> None:
    with batching_gateway(WAIT_FOR_FULL % 2) as gw, observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
        occupy(gw, "1.12", runs)
        late = send(gw, "ctr-ranker@1.12", features(1, seed=1), timeout=0.5)
        with pytest.raises(grpc.RpcError) as expired:
            late.result()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        window = gw.gateway.telemetry.windows.window(SeriesKey("ctr-ranker", "1.12", pinned=True))
        wait_for(lambda: window.stats(600).requests == 1, "the expired request to be measured")
        on_time = send(gw, "ctr-ranker@1.12", features(1, seed=2))
        other = send(gw, "ctr-ranker@1.12", features(1, seed=3))
        assert on_time.result().version == other.result().version == "1.12"
        assert runs.rows == [1, 2]  # the two on time; the expired one never ran


def test_a_batch_runs_when_it_reaches_a_preferred_size_or_its_delay() -> None:
    preferred = "{max_batch_size: 8, max_delay_ms: 10000, preferred_batch_sizes: [2, 4]}"
    with batching_gateway(preferred) as gw, observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
        occupy(gw, "1.12", runs)
        calls = [send(gw, "ctr-ranker@1.12", features(1, seed=i)) for i in range(2)]
        assert all(call.result(timeout=TRIGGERED).version == "1.12" for call in calls)  # not its 10 s delay
        assert runs.rows == [1, 2]
    with (
        batching_gateway("{max_batch_size: 8, max_delay_ms: 5}") as gw,
        observed_runs(gw.gateway, "1.12", hold_first=True) as runs,
    ):
        occupy(gw, "1.12", runs)
        x = features(3, seed=5)
        alone = send(gw, "ctr-ranker@1.12", x).result()  # waits 5 ms for company, then runs
        np.testing.assert_allclose(scores(alone), direct("1.12", x), rtol=1e-6)
        assert runs.rows == [1, 3]


def test_batching_is_off_unless_configured_and_changes_through_the_admin_api() -> None:
    with running_gateway(config_text(runner="pool"), settings={"runner_threads": 3}) as gw:
        assert gw.gateway.router.table.endpoint("ctr-ranker").batching is None
        with observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
            occupy(gw, "1.12", runs)
            calls = [send(gw, "ctr-ranker@1.12", features(1, seed=i)) for i in range(2)]
            assert all(c.result().version == "1.12" for c in calls)
            assert runs.rows == [1, 1, 1]
        settings = admin.Batching(max_batch_size=2, max_delay_ms=10000)
        change = gw.admin(
            "SetBatching", admin.SetBatchingRequest(endpoint="ctr-ranker", batching=settings, reason="merge")
        )
        assert [(c.path, c.before, c.after) for c in change.changes] == [
            ("ctr-ranker batching max_batch_size", "", "2"),
            ("ctr-ranker batching max_delay_ms", "", "10000.0"),
        ]
        with observed_runs(gw.gateway, "1.12", hold_first=True) as runs:
            occupy(gw, "1.12", runs)
            calls = [send(gw, "ctr-ranker@1.12", features(1, seed=i)) for i in range(2)]
            assert all(c.result().version == "1.12" for c in calls)
            assert runs.rows == [1, 2]
