"""Model slots: bound the model work running at once, and refuse requests beyond a queue bound,
fairly among clients.

A full service does not simply refuse a newcomer: when one client holds more places than the
newcomer's client by two or more, that client's newest request still waiting for its first pass
gives its place up (503 ``overloaded``, ``Retry-After``) and the newcomer takes it. So one client
alone may use every place, and one client can never lock the others out; requests whose passes
started are never displaced, so no work is thrown away. (The batcher then gives turns round
robin among clients: ``app.pipeline.batching``.)

(Background jobs, ``/jobs``, are ``app.pipeline.jobs``.)"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import anyio.to_thread

from app.errors import Overloaded
from app.pipeline.fairness import current_caller

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


@dataclass(eq=False)
class Ticket:
    """One admitted request's place: whose it is, and what of its work waits in a batcher's
    queue (which the place may be taken back from)."""

    caller: str
    """Its client (``app.observability.context.identity``; empty outside a request)."""
    waiting: dict[Hashable, Callable[[Exception], None]] = field(default_factory=dict)
    """Its work queued for a pass, each with the call that fails it."""
    started: bool = False
    """Some of its work entered a pass: it is never displaced after that."""
    released: bool = False

    @property
    def displaceable(self) -> bool:
        """Queued, and none of its work has started: giving the place up loses nothing."""
        return bool(self.waiting) and not self.started

    def queued(self, work: Hashable, fail: Callable[[Exception], None]) -> None:
        """``work`` waits for a pass; ``fail(error)`` answers it with ``error`` instead."""
        self.waiting[work] = fail

    def dequeued(self, work: Hashable, *, into_pass: bool = False) -> None:
        """``work`` left the queue: into a pass, or answered (done, failed or cancelled)."""
        self.waiting.pop(work, None)
        self.started = self.started or into_pass

    def displace(self, error: Exception) -> None:
        fails = list(self.waiting.values())
        self.waiting.clear()
        for fail in fails:
            fail(error)


_ticket: ContextVar[Ticket | None] = ContextVar("camserve_admission_ticket", default=None)


def current_ticket() -> Ticket | None:
    """The place of the request whose work is being submitted (None for work not admitted:
    background jobs, calls outside ``SlotLimiter.admit``)."""
    return _ticket.get()


class SlotLimiter:
    """At most ``max_running`` model slots busy in worker threads; ``max_waiting`` more
    requests may wait for one.

    A request is *admitted* (counted, or refused with 503) for as long as it waits for or takes
    part in model work; the work itself runs in a *slot*. With cross-request batching several
    admitted requests share one slot."""

    def __init__(
        self,
        max_running: int,
        max_waiting: int,
        on_displace: Callable[[], None] | None = None,
    ) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.on_displace = on_displace
        """Told every time a request gave its place up to another client's."""
        self._slots = asyncio.Semaphore(max_running)
        self._admitted = 0
        self._held: dict[str, list[Ticket]] = {}
        """Each client's places, oldest first."""
        self._mean_seconds = 0.5

    @property
    def in_flight(self) -> int:
        """Requests admitted: running in a slot or waiting for one."""
        return self._admitted

    def held_by(self, caller: str) -> int:
        """Places ``caller`` holds now."""
        return len(self._held.get(caller, ()))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: roughly the time to drain the queue."""
        backlog = self._admitted / self.max_running
        return max(1, math.ceil(backlog * self._mean_seconds))

    @contextmanager
    def admit(self, caller: str | None = None) -> Iterator[Ticket]:
        """Count one request of ``caller`` (default: the current request's client) as in flight
        for the block. When every place is taken, a place of a client holding at least two more
        than ``caller`` is taken back (``_displace_for``); else Overloaded."""
        if caller is None:
            caller = current_caller()
        if self._admitted >= self.max_running + self.max_waiting and not self._displace_for(caller):
            raise Overloaded(
                f"The service is busy ({self._admitted} requests running or queued); "
                "retry after the number of seconds in Retry-After.",
                headers={"Retry-After": str(self.retry_after())},
            )
        ticket = Ticket(caller)
        self._admitted += 1
        self._held.setdefault(caller, []).append(ticket)
        token = _ticket.set(ticket)
        try:
            yield ticket
        finally:
            _ticket.reset(token)
            self._release(ticket)

    def _release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._admitted -= 1
        mine = self._held[ticket.caller]
        mine.remove(ticket)
        if not mine:
            del self._held[ticket.caller]

    def _displace_for(self, caller: str) -> bool:
        """Give ``caller`` a place taken back from the client holding the most (at least two
        more than ``caller``): that client's newest request still waiting for its first pass.
        False when no such request exists."""
        floor = self.held_by(caller) + 2
        heavy = sorted(
            (tickets for client, tickets in self._held.items() if client != caller),
            key=len,
            reverse=True,
        )
        for tickets in heavy:
            if len(tickets) < floor:
                break
            for ticket in reversed(tickets):
                if ticket.displaceable:
                    held = len(tickets)
                    self._release(ticket)  # the place is the newcomer's from now on
                    ticket.displace(
                        Overloaded(
                            f"The service is full and your client holds the most of its places "
                            f"({held} of {self.max_running + self.max_waiting}): this request, "
                            "your newest still waiting, gave its place to another client's. "
                            "Send fewer requests at once, or retry after the number of seconds "
                            "in Retry-After.",
                            headers={"Retry-After": str(self.retry_after())},
                        )
                    )
                    if self.on_displace is not None:
                        self.on_displace()
                    return True
        return False

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
