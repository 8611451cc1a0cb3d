"""A weighted semaphore over memory: decoding waits until the bytes it will take are free.

One budget is shared by every request and job of a process, so the memory decoded images hold
at once stays under ``capacity`` bytes whatever the clients send. Waiters are served in turn,
never overtaken by a later one that would fit (a large request is not starved by a stream of
small ones), and turns go round robin among clients, weighed by their bytes
(``app.pipeline.fairness``): a client with many large requests waiting delays another client's
next one by at most one of its own.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.pipeline.fairness import FairTurns, current_caller


@dataclass(order=True)
class _Waiter:
    tag: int
    arrived: int
    amount: int = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)


class MemoryBudget:
    """``capacity`` bytes, held by ``hold(amount)`` blocks; each waits for its turn."""

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
    async def hold(self, amount: int, client: str | None = None) -> AsyncIterator[None]:
        """Hold ``amount`` bytes for the block, waiting for its turn until they are free.
        ``client``: whose turn it is (default: the current request's client). ``amount`` must
        not exceed the capacity (the caller refuses such work instead)."""
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes exceed the budget of {self.capacity}")
        tag = self._turns.tag(current_caller() if client is None else client, amount)
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
