"""A weighted semaphore over memory: decoding waits until the bytes it will take are free.

One budget is shared by every request and job of a process, so the memory decoded images hold
at once stays under ``capacity`` bytes whatever the clients send. Waiters are served in arrival
order: a large request is not starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class MemoryBudget:
    """``capacity`` bytes, held by ``hold(amount)`` blocks; each waits for its turn (FIFO)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        """Hold ``amount`` bytes for the block, waiting until they are free. ``amount`` must not
        exceed the capacity (the caller refuses such work instead)."""
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes exceed the budget of {self.capacity}")
        if not self._waiters and self.held + amount <= self.capacity:
            self.held += amount
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (amount, granted)
            self._waiters.append(entry)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release(amount)  # granted, then cancelled before it could run
                else:
                    self._waiters.remove(entry)
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
        while self._waiters and self.held + self._waiters[0][0] <= self.capacity:
            amount, granted = self._waiters.popleft()
            self.held += amount
            granted.set_result(None)
