"""Model slots: bound the model work running at once, and refuse requests beyond a queue bound.

(Background jobs, ``/jobs``, are ``app.pipeline.jobs``.)"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import TypeVar

import anyio.to_thread

from app.errors import Overloaded

T = TypeVar("T")


async def run_to_the_end(executor: Executor | None, func: Callable[[], T]) -> T:
    """``func`` on one of ``executor``'s threads (None: the loop's default pool). A cancelled
    caller waits for the thread to finish before it goes, so no work runs on unseen (and the
    work's own error, if any, is retrieved: nobody is left to read it)."""
    return await run_stoppable(executor, lambda _stopped: func())


async def run_stoppable(executor: Executor | None, func: Callable[[Callable[[], bool]], T]) -> T:
    """``func(stopped)`` on one of ``executor``'s threads: a cancelled caller first tells the
    work to stop (``stopped()`` turns true, for the work to check between its pieces), then waits
    for the thread to finish before it goes (``run_to_the_end``: work that does not ask)."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(executor, func, stop.is_set)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({future})
        _ = future.exception()
        raise


class SlotLimiter:
    """At most ``max_running`` model slots busy in worker threads; ``max_waiting`` more
    requests may wait for one.

    A request is *admitted* (counted, or refused with 503) for as long as it waits for or takes
    part in model work; the work itself runs in a *slot*. With cross-request batching several
    admitted requests share one slot."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self._admitted = 0
        self._mean_seconds = 0.5

    @property
    def in_flight(self) -> int:
        """Requests admitted: running in a slot or waiting for one."""
        return self._admitted

    def retry_after(self) -> int:
        """Seconds a refused client should wait: roughly the time to drain the queue."""
        backlog = self._admitted / self.max_running
        return max(1, math.ceil(backlog * self._mean_seconds))

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count one request as in flight for the block; Overloaded if the queue is full."""
        if self._admitted >= self.max_running + self.max_waiting:
            raise Overloaded(
                f"The service is busy ({self._admitted} requests running or queued); "
                "retry after the number of seconds in Retry-After.",
                headers={"Retry-After": str(self.retry_after())},
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def run_in_slot(self, func: Callable[[], T], executor: Executor | None = None) -> T:
        """Run ``func`` in a worker thread (of ``executor`` if given) once a slot is free.

        No admission of its own. Not abandoned on cancel: the slot stays taken until the thread
        really ends."""
        async with self._slots:
            started = time.perf_counter()
            if executor is None:
                result = await anyio.to_thread.run_sync(func)
            else:
                result = await run_to_the_end(executor, func)
            elapsed = time.perf_counter() - started
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * elapsed
            return result
