"""Run a stage's blocking model work off the event loop: one request at a time, bounded queue, progress, cancel.

A servicer does `async for event in worker.stream(job): ...`: `job(emit, should_stop)` runs in the stage's
single worker thread (GPU work is serialised per stage: `serve all` runs three stages' workers side by side),
`emit(x)` sends progress back to the servicer, and `should_stop()` turns True when the caller cancelled or its
deadline passed, so the job can stop between two steps. The job's return value comes last, as `Done(value)`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from smartdiff.shared import metrics
from smartdiff.shared.errors import Cancelled, DeadlineExceeded, Overloaded
from smartdiff.shared.memory import is_out_of_memory, oom_detail, release_cached_memory

Emit = Callable[[Any], None]
ShouldStop = Callable[[], bool]
Job = Callable[[Emit, ShouldStop], Any]


@dataclass(frozen=True)
class Done:
    value: Any


_FINISHED = object()


def use_device(device: torch.device | str | None) -> None:
    """Make a CUDA `device` the calling thread's current device (no-op otherwise). Each thread starts on cuda:0,
    and Triton kernels, CUDA events and the default streams follow the current device, not their tensors': a
    stage on cuda:1 that ran its work on a fresh thread launched its Triton kernels on cuda:0 and recorded its
    copy events on a stream that never saw the copies."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(device)


_WORKERS: weakref.WeakSet = weakref.WeakSet()


def busy_workers() -> list[str]:
    """Names of the process's stage workers with a job admitted and not finished."""
    return sorted(w.name for w in list(_WORKERS) if w.pending)


class StageWorker:
    """A single worker thread with an admission limit: past `max_pending` requests, Overloaded. `device`: the
    stage's device, made current on the thread (use_device)."""

    def __init__(self, name: str, max_pending: int = 8, device: torch.device | str | None = None):
        self.name = name
        self.max_pending = max_pending
        self.pending = 0  # (the property below: sets the metric too)
        device = None if device is None else torch.device(device)
        if device is not None and device.type == "cuda" and device.index is None:  # "cuda": this thread's device,
            device = torch.device("cuda", torch.cuda.current_device())  # where the stage's weights were put
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-worker",
                                            initializer=use_device, initargs=(device,))
        _WORKERS.add(self)

    async def run(self, fn: Callable[[], Any]) -> Any:
        """fn() on the worker thread, outside the admission limit: the stage's warm-up, before it serves."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def pending(self) -> int:
        """Jobs admitted and not yet finished (queued + running); the `smartdiff_jobs` metric follows it."""
        return self._pending

    @pending.setter
    def pending(self, n: int) -> None:
        self._pending = n
        metrics.JOBS.labels(self.name).set(n)

    async def stream(self, job: Job, context=None) -> AsyncIterator[Any]:
        """Run `job`, yielding what it emits, then Done(result).

        `context`: the gRPC call's; its deadline makes `should_stop()` True once passed, and a job that then
        stops with Cancelled is reported as DeadlineExceeded. If the consumer stops iterating (client
        cancel) the job is told to stop at its next check.
        """
        left = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + left if left is not None else None
        if self.pending >= self.max_pending:
            raise Overloaded(f"{self.name}: {self.pending} requests in flight (limit {self.max_pending}); retry later")
        self.pending += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed (its server stopped after a drain ran out): nobody reads the
                stop.set()  # job's progress any more; it stops at its next check (in step with a pod's other ranks)

        def should_stop() -> bool:
            return stop.is_set() or (deadline is not None and time.monotonic() > deadline)

        def finished(future) -> None:  # runs on the loop, after every emit of the job was delivered
            self.pending -= 1
            if not future.cancelled():
                future.exception()  # retrieved: a consumer that left (cancel, deadline) no longer awaits it
            queue.put_nowait(_FINISHED)

        future = loop.run_in_executor(self._executor, self._run, job, emit, should_stop)
        future.add_done_callback(finished)
        try:
            while (item := await queue.get()) is not _FINISHED:
                yield item
            try:
                result = await future
            except Cancelled:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"{self.name}: deadline exceeded") from None
                raise
            yield Done(result)
        finally:
            stop.set()  # no-op when the job finished; stops it at its next check otherwise

    def _run(self, job: Job, emit: Emit, should_stop: ShouldStop) -> Any:
        """The job; running out of device memory frees the allocator's cache for the next request and becomes
        Overloaded (RESOURCE_EXHAUSTED) with the device's own message."""
        try:
            return job(emit, should_stop)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            detail = oom_detail(exc)
        release_cached_memory()
        raise Overloaded(f"{self.name}: out of device memory for this request ({detail}); retry with a smaller "
                         "size, or on a deployment with a higher low-memory level")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
