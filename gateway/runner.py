"""`ModelRunner`: where model runs happen, inline on the event loop or on a bounded thread pool.

onnxruntime releases the GIL while a graph executes, so runs on runner threads proceed on
several cores at once while the event loop keeps decoding and answering other requests. A
hand-off to a thread costs tens of microseconds of CPU (a queue, a wake-up, a call back into
the loop), more than a small model's whole run, so runs whose cost, measured when the
version was loaded (`OnnxModel.cost`), is under `inline_max_seconds` stay on the loop. An
endpoint's `runner` setting overrides the choice: `inline` or `pool`.

Deadlines travel with the work: a run whose caller's deadline has passed before a thread
picks it up is not started, and one whose caller went away (its future cancelled) is
dropped from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from gateway.errors import DeadlineExceeded, InvalidInput, NotReady
from gateway.routing import EndpointRoutes, RouteDecision
from gateway.runtime import OnnxModel

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Runs estimated to cost more than this leave the event loop. A hand-off costs the server 100-150 us
#: of CPU on the 2-core benchmark VM (benchmarks/RESULTS.md): shorter runs are cheaper inline.
DEFAULT_INLINE_MAX_SECONDS = 200e-6


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunnerSettings:
    """Size of the runner pool (0: one thread per core) and the cost above which runs leave the loop."""

    threads: int = 0
    inline_max_seconds: float = DEFAULT_INLINE_MAX_SECONDS

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise InvalidInput(f"runner threads {self.threads}: give a positive number, or 0 for one per core")
        if self.inline_max_seconds < 0:
            raise InvalidInput(f"inline run limit {self.inline_max_seconds * 1e6:g} us must be 0 or more")


class ModelRunner:
    """Owns the runner threads and decides, per run, whether it leaves the event loop."""

    def __init__(self, settings: RunnerSettings | None = None) -> None:
        self.settings = settings or RunnerSettings()
        self.threads = self.settings.threads or default_threads()
        self.inline_max_seconds = self.settings.inline_max_seconds
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Create the pool (threads start on first use). Until started, every run is inline."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="runner")

    def shutdown(self) -> None:
        """Finish queued runs and stop the threads."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)

    @property
    def started(self) -> bool:
        """Whether runs can leave the loop."""
        return self._pool is not None

    def off_loop(self, model: OnnxModel, rows: int, mode: str) -> bool:
        """Whether a run of `rows` rows on `model` goes to the pool (`mode`: the endpoint's runner setting)."""
        if self._pool is None or mode == "inline":
            return False
        return mode == "pool" or model.dynamic_inner or model.cost.seconds(rows) > self.inline_max_seconds

    def run(self, function: Callable[..., T], *args: Any, after: Callable[[], None] | None = None) -> asyncio.Future[T]:
        """`function(*args)` on a runner thread; cancelling the returned future before it starts drops it.

        `after` is called once the work is over: when it returns or fails, or when it is dropped
        before it started. A caller that leaves mid-run does not end the run, so what the run
        holds (its admission slot) is given back by `after`, never earlier.
        """
        if self._pool is None:
            raise NotReady("the gateway is not running models now (starting or shutting down); retry")
        try:
            work = self._pool.submit(function, *args)
        except RuntimeError:  # the pool shut down meanwhile
            raise NotReady("the gateway is shutting down; retry on another instance") from None
        if after is not None:
            work.add_done_callback(lambda _: after())
        return asyncio.wrap_future(work)

    def describe(self, endpoint: str, version: str, model: OnnxModel) -> str:
        """Where runs of this version happen under `runner: auto`, and why (for the logs)."""
        cost = model.cost.seconds(1)
        limit = f"{self.inline_max_seconds * 1e6:.0f} us"
        if model.dynamic_inner:
            where = (
                f"an input has a free dimension besides the batch (its cost was measured at size 1 there): "
                f"runs go to the runner pool ({self.threads} threads)"
            )
        elif cost > self.inline_max_seconds:
            where = f"above the {limit} inline limit: runs go to the runner pool ({self.threads} threads)"
        else:
            rows = self._rows_inline(model)
            extra = f"; runs of more than {rows} rows go to the runner pool" if rows else ""
            where = f"within the {limit} inline limit: batch-1 runs stay on the event loop{extra}"
        return (
            f"{endpoint} {version}: {model.cost.describe()}, {where} "
            f"(with runner: auto; the endpoint's runner setting overrides)"
        )

    def _rows_inline(self, model: OnnxModel) -> int:
        """The most rows a run may have and stay inline (0 when any number does)."""
        per_row = model.cost.per_row_seconds
        if per_row <= 0:
            return 0
        return 1 + int((self.inline_max_seconds - model.cost.first_row_seconds) / per_row)


def timed_run(  # noqa: PLR0917 - per request: positional is cheaper
    time_left: Callable[[], float | None] | None,
    routes: EndpointRoutes,
    decision: RouteDecision,
    model: OnnxModel,
    inputs: Mapping[str, np.ndarray],
    wanted: tuple[str, ...],
) -> tuple[list[np.ndarray], float]:
    """The model's outputs (within the caller's deadline, when there is one) and how long the run took."""
    ran = time.perf_counter()
    if time_left is None:
        arrays = model.run(inputs, wanted)
    else:
        arrays = run_within(time_left, routes, decision, model, inputs, wanted)
    return arrays, time.perf_counter() - ran


def run_within(  # noqa: PLR0917 - per request: positional is cheaper
    time_left: Callable[[], float | None],
    routes: EndpointRoutes,
    decision: RouteDecision,
    model: OnnxModel,
    inputs: Mapping[str, np.ndarray],
    wanted: tuple[str, ...],
) -> list[np.ndarray]:
    """Run the model unless the caller's deadline has passed; DEADLINE_EXCEEDED if it passes meanwhile."""
    where = f"{routes.name} {decision.version}: the caller's deadline passed"
    remaining = time_left()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"{where} before the model ran; it was not run")
    arrays = model.run(inputs, wanted)
    remaining = time_left()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"{where} while the model ran; the answer was dropped")
    return arrays
