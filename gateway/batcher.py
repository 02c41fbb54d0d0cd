"""Adaptive batching: concurrent requests routed to one model version, merged into one run.

Requests arrive here already routed, checked and measured apart: a batch only ever holds
requests for the same loaded model, so a request pinned to another version, or routed after
a rollback, never shares it. A request that finds its version idle (nothing waiting, nothing
running) runs at once: there is nothing to wait for, and at low load waiting would only add
`max_delay_ms` to every request. Otherwise it joins the waiting batch, which is dispatched
when its rows reach the endpoint's `max_batch_size` or one of its `preferred_batch_sizes`,
or when its oldest request has waited `max_delay_ms`. The merged run is one onnxruntime
call on the inputs concatenated along the batch dimension; each request gets its own rows
of each output back.

A run that fails is retried request by request, so each request gets the result or the
error it would have got alone and never fails its batch-mates. Requests whose caller went
away are dropped before the run, those whose deadline passed are answered
DEADLINE_EXCEEDED without running, and one whose deadline passed during the run gets
DEADLINE_EXCEEDED instead of its rows, as it would have alone.

Each request's admission slot (`gateway/admission.py`) waits and runs with it: the batcher
gives it back when the request leaves the queue (its caller gone) or its run is over.

Batches are formed on the event loop (list appends and one timer); the run itself goes
through the `ModelRunner`, inline or on a runner thread by its estimated cost.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gateway.admission import Slot
from gateway.config import BatchingConfig
from gateway.errors import DeadlineExceeded
from gateway.runner import ModelRunner
from gateway.runtime import OnnxModel

Outputs = list[np.ndarray]
#: What a request gets: its outputs, how many requests shared its run, and the run's seconds.
Result = tuple[Outputs, int, float]
#: Each request's outcome, in entry order: its `Result`, or its error.
BatchOutcome = list["Result | BaseException"]
#: Seconds until a deadline (None: no deadline), on admission's clock.
TimeLeft = Callable[[float | None], float | None]


class _Entry:
    """One request waiting in a batch, with its admission slot and deadline (admission's clock; None: none)."""

    __slots__ = ("deadline", "feeds", "future", "rows", "slot", "wanted")

    def __init__(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        feeds: Mapping[str, np.ndarray],
        wanted: Sequence[str],
        rows: int,
        slot: Slot,
        deadline: float | None,
        future: asyncio.Future[Result],
    ) -> None:
        self.feeds = feeds
        self.wanted = wanted
        self.rows = rows
        self.slot = slot
        self.deadline = deadline
        self.future = future


def _expired(left: TimeLeft, deadline: float | None) -> bool:
    remaining = left(deadline)
    return remaining is not None and remaining <= 0


def _alone(model: OnnxModel, entry: _Entry, left: TimeLeft) -> Result | BaseException:
    ran = time.perf_counter()
    try:
        arrays = model.run(entry.feeds, entry.wanted)
    except Exception as err:  # the request's own error, delivered to it alone
        return err
    if _expired(left, entry.deadline):
        return DeadlineExceeded(f"{model.source}: the request's deadline passed while the model ran; answer dropped")
    return arrays, 1, time.perf_counter() - ran


def _merged(
    model: OnnxModel, entries: Sequence[_Entry], indices: Sequence[int], left: TimeLeft
) -> list[Result | BaseException] | None:
    """One run over the requests' rows, split back per request.

    None when the run failed, or its outputs do not have one row per input row (detections,
    an export fixed to batch 1): the requests then run alone.
    """
    ran = time.perf_counter()
    try:
        merged = {spec.name: np.concatenate([entries[i].feeds[spec.name] for i in indices]) for spec in model.inputs}
        arrays = model.run(merged, model.output_names)
    except Exception:  # each request runs alone and gets its own error
        return None
    seconds = time.perf_counter() - ran
    rows = sum(entries[i].rows for i in indices)
    if any(array.shape[0] != rows for array in arrays):
        return None
    position = {name: i for i, name in enumerate(model.output_names)}
    results: list[Result | BaseException] = []
    start = 0
    for index in indices:
        entry = entries[index]
        end = start + entry.rows
        if _expired(left, entry.deadline):
            results.append(
                DeadlineExceeded(f"{model.source}: the request's deadline passed while its batch ran; answer dropped")
            )
        else:
            results.append(([arrays[position[name]][start:end] for name in entry.wanted], len(indices), seconds))
        start = end
    return results


def run_batch(model: OnnxModel, entries: Sequence[_Entry], left: TimeLeft) -> BatchOutcome:
    """Run the entries' requests as one merged run: each gets its outputs or its own error, in entry order.

    A request whose inputs disagree on their rows cannot be split back out of a merged run, and
    a merged run that fails (or whose outputs are not per row) gives way to runs alone: each
    request gets exactly what it would have got without batching. Runs on the event loop or a
    runner thread; it reads the entries' futures only to skip callers that went away.
    """
    results: BatchOutcome = []
    live = []
    for entry in entries:
        if entry.future.done():
            results.append(DeadlineExceeded("the caller went away before the run"))
        elif _expired(left, entry.deadline):
            results.append(
                DeadlineExceeded(
                    f"{model.source}: the request's deadline passed while it waited for its batch; it was not run"
                )
            )
        else:
            live.append(len(results))
            results.append(_NOT_RUN)
    mergeable = [i for i in live if all(a.shape[0] == entries[i].rows for a in entries[i].feeds.values())]
    if len(mergeable) > 1:
        merged = _merged(model, entries, mergeable, left)
        if merged is not None:
            for index, result in zip(mergeable, merged, strict=True):
                results[index] = result
            merged_in = set(mergeable)
            live = [i for i in live if i not in merged_in]
    for index in live:
        results[index] = _alone(model, entries[index], left)
    return results


_NOT_RUN = RuntimeError("not run")


class _Queue:
    """The requests waiting for one model version's next batch, and how many of its requests are running."""

    __slots__ = ("entries", "rows", "running", "timer")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.rows = 0
        self.timer: asyncio.TimerHandle | None = None
        self.running = 0


class Batcher:
    """Forms batches per loaded model on the event loop and hands them to the runner.

    Keyed by the model object itself (weakly): requests routed to different versions, or to
    a version loaded again, never share a queue, and an unloaded version's queue goes with it.
    `left` tells the seconds until a deadline on the admission clock (`Admission.left`).
    """

    def __init__(self, runner: ModelRunner, left: TimeLeft) -> None:
        self._runner = runner
        self._left = left
        self._queues: weakref.WeakKeyDictionary[OnnxModel, _Queue] = weakref.WeakKeyDictionary()

    def submit(  # noqa: PLR0917 - per request: positional is cheaper
        self,
        model: OnnxModel,
        feeds: Mapping[str, np.ndarray],
        wanted: Sequence[str],
        rows: int,
        policy: BatchingConfig,
        runner_mode: str,
        slot: Slot,
        deadline: float | None = None,
    ) -> asyncio.Future[Result]:
        """Queue one checked request, taking over its slot; the future gives its `Result`.

        Cancelling the future (the caller left) drops the request from its batch if it has not
        run yet; its slot is given back then, or when its batch's run is over.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues.setdefault(model, _Queue())
        if (
            queue.entries
            and queue.rows + rows > policy.max_batch_size
            and not (_prune(queue) and queue.rows + rows <= policy.max_batch_size)
        ):
            self._dispatch(model, queue, runner_mode)  # it would overflow: send what waits, start anew
        before = queue.rows
        queue.entries.append(_Entry(feeds, wanted, rows, slot, deadline, future))
        queue.rows += rows
        if not before and not queue.running:
            self._dispatch(model, queue, runner_mode)  # nothing to wait for: the version is idle
        elif _ready(policy, before, queue.rows) and (
            not _prune(queue) or _ready(policy, queue.rows - rows, queue.rows)
        ):
            self._dispatch(model, queue, runner_mode)
        elif queue.timer is None:
            queue.timer = loop.call_later(
                policy.max_delay_ms / 1000,
                self._dispatch,
                model,
                queue,
                runner_mode,
                context=contextvars.Context(),  # the batch's, not its first request's (ids in log lines)
            )
        return future

    def _dispatch(self, model: OnnxModel, queue: _Queue, runner_mode: str) -> None:
        entries = queue.entries
        queue.entries, queue.rows = [], 0
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        entries = _live(entries)  # callers that went away leave (and give their slots back)
        if not entries:
            return
        rows = sum(e.rows for e in entries)
        queue.running += len(entries)
        try:
            if self._runner.off_loop(model, rows, runner_mode):
                run = self._runner.run(run_batch, model, entries, self._left)
                run.add_done_callback(lambda done: _resolve(queue, entries, done))
            else:
                _deliver(queue, entries, run_batch(model, entries, self._left))
        except Exception as err:  # the pool is shut down: no request may wait forever
            _fail(queue, entries, err)

    def leave(self, model: OnnxModel, future: asyncio.Future[Result]) -> None:
        """A request whose caller left: out of its batch, its slot given back, if its batch has not run yet.

        (A request already in a run keeps its slot until the run is over.)
        """
        queue = self._queues.get(model)
        if queue is None:
            return
        for index, entry in enumerate(queue.entries):
            if entry.future is future:
                del queue.entries[index]
                queue.rows -= entry.rows
                entry.slot.release()
                return

    def pending(self) -> int:
        """Requests waiting for a batch (for tests and introspection)."""
        return sum(len(q.entries) for q in list(self._queues.values()))


def _ready(policy: BatchingConfig, before: int, after: int) -> bool:
    """Whether a batch that grew from `before` to `after` rows is full or just reached a preferred size."""
    if after >= policy.max_batch_size:
        return True
    preferred = policy.preferred_batch_sizes
    return bool(preferred) and bisect_right(preferred, after) > bisect_right(preferred, before)


def _live(entries: list[_Entry]) -> list[_Entry]:
    """The entries whose caller still waits; the others' slots are given back."""
    live = []
    for entry in entries:
        if entry.future.done():
            entry.slot.release()
        else:
            live.append(entry)
    return live


def _prune(queue: _Queue) -> bool:
    """Forget waiting requests whose caller went away (so they take no room); True when there were any."""
    live = _live(queue.entries)
    if len(live) == len(queue.entries):
        return False
    queue.entries = live
    queue.rows = sum(e.rows for e in live)
    return True


def _deliver(queue: _Queue, entries: Sequence[_Entry], results: BatchOutcome) -> None:
    queue.running -= len(entries)
    for entry, result in zip(entries, results, strict=True):
        entry.slot.release()
        if entry.future.done():
            continue
        if isinstance(result, BaseException):
            entry.future.set_exception(result)
        else:
            entry.future.set_result(result)


def _fail(queue: _Queue, entries: Sequence[_Entry], error: BaseException) -> None:
    queue.running -= len(entries)
    for entry in entries:
        entry.slot.release()
        if not entry.future.done():
            entry.future.set_exception(error)


def _resolve(queue: _Queue, entries: Sequence[_Entry], done: asyncio.Future[BatchOutcome]) -> None:
    if done.cancelled():
        _fail(queue, entries, DeadlineExceeded("the batch was cancelled before it ran"))
        return
    error = done.exception()
    if error is not None:
        _fail(queue, entries, error)
        return
    _deliver(queue, entries, done.result())
