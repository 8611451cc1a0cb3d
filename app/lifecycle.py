"""The service's life after SIGTERM: drain (refuse new work, finish what runs), then cut.

``begin_drain`` is called from the signal handler; everything else runs on the event loop. The
server (``app.__main__``) asks ``ready_to_exit`` on every tick of its main loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

#: After the cut, how long the cut requests get to send their 503 before the server stops.
CUT_MARGIN_S = 2.0
#: At the lifespan's end, the least time the model threads get to end (a pass that was cut
#: reaches its next chunk boundary, a load its end), whatever is left of the grace period.
THREADS_MIN_S = 2.0


class Lifecycle:
    """Whether the service drains, what is still in flight, and when the rest is cut."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.cut = asyncio.Event()
        """Set once the grace period is over: in-flight work stops and answers 503."""
        self._drain_started: float | None = None
        self._in_flight = 0
        self._on_cut: list[Callable[[], None]] = []

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count a request or job as in flight for the block (the drain waits for it)."""
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    def on_cut(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop when the grace period ends with work still in flight."""
        self._on_cut.append(callback)

    def begin_drain(self) -> None:
        """Start draining (idempotent; safe in a signal handler: it only sets plain fields)."""
        if not self.draining:
            self._drain_started = time.monotonic()
            self.draining = True

    def grace_left(self) -> float:
        """Seconds left of the grace period (all of it before a drain began)."""
        if self._drain_started is None:
            return self.grace_s
        return max(0.0, self.grace_s - (time.monotonic() - self._drain_started))

    def ready_to_exit(self) -> bool:
        """Whether the server may stop now; cuts late work once the grace period is over."""
        if self._drain_started is None:
            return False
        elapsed = time.monotonic() - self._drain_started
        if self._in_flight == 0:
            logger.info("drained in %.1f s; stopping", elapsed)
            return True
        if elapsed < self.grace_s:
            return False
        if not self.cut.is_set():
            logger.warning(
                "shutdown grace of %.0f s is over with %d request(s) or job(s) in flight; "
                "cutting them with 503 shutting_down",
                self.grace_s,
                self._in_flight,
            )
            self.cut.set()
            for callback in self._on_cut:
                callback()
        return elapsed >= self.grace_s + CUT_MARGIN_S


async def joined_within(seconds: float, work: Awaitable[Any], threads: Executor) -> bool:
    """Whether ``work`` ends, and then ``threads`` end their tasks, within ``seconds``.

    The threads are joined from a daemon thread of its own: a task stuck in the file system (a
    model load on a hung network mount) holds neither the lifespan nor the loop's executor at
    its close. False: something is still running, and the process must leave without joining
    it (``app.__main__``); a thread pool's threads are otherwise joined at the interpreter's
    exit, for ever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        await asyncio.wait_for(asyncio.shield(work), seconds)
    except TimeoutError:
        return False
    joined = asyncio.Event()

    def join() -> None:
        threads.shutdown(wait=True)
        try:
            loop.call_soon_threadsafe(joined.set)
        except RuntimeError:  # the loop closed while it waited
            pass

    threading.Thread(target=join, name="camserve-join", daemon=True).start()
    try:
        await asyncio.wait_for(joined.wait(), max(0.0, deadline - loop.time()))
    except TimeoutError:
        return False
    return True
