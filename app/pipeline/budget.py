"""Budgets that work waits for: memory (decoded images, pictures being drawn) and threads.

A ``Budget`` is a weighted semaphore: ``capacity`` units (bytes, or threads), held by blocks
that each wait until the units they take are free. The decode budget is shared by every request
and job of a process, so the memory decoded images hold at once stays under its capacity whatever
the clients send. Waiters are served in turn, never overtaken by a later one that would fit (a
large request is not starved by a stream of small ones), and turns go round robin among
clients, weighed by what each asks for (``app.pipeline.fairness``): a client with many large
requests waiting delays another client's next one by at most one of its own.

``FairThreads`` takes a thread pool's threads through such a budget, so that the decoding work
queued for the pool goes in the same fair turns rather than first come first served.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from app.pipeline.admission import run_to_the_end
from app.pipeline.fairness import FairTurns, current_caller

T = TypeVar("T")


@dataclass(order=True)
class _Waiter:
    tag: int
    arrived: int
    amount: int = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)


class Budget:
    """``capacity`` units, held by ``hold(amount)`` blocks; each waits for its turn."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: list[_Waiter] = []
        """In turn order (tag, then arrival)."""
        self._turns = FairTurns()
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def hold(
        self, amount: int, client: str | None = None, cost: int | None = None
    ) -> AsyncIterator[None]:
        """Hold ``amount`` units for the block, waiting for its turn until they are free.
        ``client``: whose turn it is (default: the current request's client); ``cost``: what
        the turn weighs (default: ``amount``). ``amount`` must not exceed the capacity (the
        caller refuses such work instead)."""
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes exceed the budget of {self.capacity}")
        weight = amount if cost is None else cost
        who = current_caller() if client is None else client
        tag = self._turns.tag(who, weight)
        if not self._waiters and self.held + amount <= self.capacity:
            self.held += amount
            self._turns.turn(tag)
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(tag, next(self._arrivals), amount, granted)
            bisect.insort(self._waiters, waiter)
            self._wake()  # its turn may come before the waiters' it was put ahead of
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release(amount)  # granted, then cancelled before it could run
                else:
                    self._waiters.remove(waiter)
                    self._wake()  # a large waiter leaving may let smaller ones through
                raise
        try:
            yield
        finally:
            self._turns.left(who)  # before the next waiter's turn: see FairTurns
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.held -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held + self._waiters[0].amount <= self.capacity:
            waiter = self._waiters.pop(0)
            self.held += waiter.amount
            self._turns.turn(waiter.tag)
            waiter.granted.set_result(None)


class FairThreads:
    """``executor``'s threads in fair turns: at most one task per thread is handed to the pool
    at a time, and the next one is the first in turn (``Budget``, each task weighed by its
    ``cost``): a client's large decodes queued before another client's small one no longer
    all run first. A pool used only through it never queues a task of its own."""

    def __init__(self, executor: Executor | None) -> None:
        self.executor = executor
        self._threads = (
            Budget(max(1, executor._max_workers))
            if isinstance(executor, ThreadPoolExecutor)
            else None  # a pool of unknown size (the loop's default): its own order
        )

    async def run(self, func: Callable[[], T], cost: int = 1) -> T:
        """``func`` on one of the threads once its turn comes, to the end (``run_to_the_end``)."""
        if self._threads is None:
            return await run_to_the_end(self.executor, func)
        async with self._threads.hold(1, cost=cost):
            return await run_to_the_end(self.executor, func)
