"""The slot limiter bounds concurrent model work and refuses requests beyond its queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.errors import Overloaded
from app.pipeline.admission import SlotLimiter


async def run_request(limiter: SlotLimiter, func):  # type: ignore[no-untyped-def]
    """What the batcher does for a request: admit it, then run its work in a slot."""
    with limiter.admit():
        return await limiter.run_in_slot(func)


def test_bounds_busy_slots_and_refuses_beyond_queue() -> None:
    async def scenario() -> None:
        limiter = SlotLimiter(max_running=2, max_waiting=1)
        running, peak = 0, 0
        lock = threading.Lock()
        release = threading.Event()

        def work() -> int:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            release.wait(5)
            with lock:
                running -= 1
            return 1

        tasks = [asyncio.ensure_future(run_request(limiter, work)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert limiter.in_flight == 3
        with pytest.raises(Overloaded) as caught:
            await run_request(limiter, work)
        assert int(caught.value.headers["Retry-After"]) >= 1
        release.set()
        assert await asyncio.gather(*tasks) == [1, 1, 1]
        assert peak == 2
        assert limiter.in_flight == 0

    asyncio.run(scenario())


def test_errors_free_the_slot() -> None:
    async def scenario() -> None:
        limiter = SlotLimiter(max_running=1, max_waiting=0)

        def fail() -> None:
            raise ValueError("bad")

        with pytest.raises(ValueError):
            await run_request(limiter, fail)
        assert await run_request(limiter, lambda: time.sleep(0) or 5) == 5

    asyncio.run(scenario())
