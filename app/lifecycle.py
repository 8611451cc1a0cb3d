"""The service's life after SIGTERM: drain (refuse new work, finish what runs), then cut.

``begin_drain`` is called from the signal handler; everything else runs on the event loop. The
server (``app.__main__``) asks ``ready_to_exit`` on every tick of its main loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

#: After the cut, how long the cut requests get to send their 503 before the server stops.
CUT_MARGIN_S = 2.0


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
