"""``app.lifecycle.joined_within``: the lifespan's last wait, bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from app.lifecycle import Lifecycle, joined_within


def test_threads_that_end_are_joined() -> None:
    async def run() -> bool:
        threads = ThreadPoolExecutor(2)
        work = asyncio.get_running_loop().run_in_executor(threads, time.sleep, 0.05)
        return await joined_within(5, work, threads)

    assert asyncio.run(run()) is True


def test_a_stuck_thread_is_left_after_the_bound() -> None:
    release = threading.Event()

    async def run() -> tuple[bool, float]:
        threads = ThreadPoolExecutor(2)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(threads, time.sleep, 0)
        threads.submit(release.wait, 30)  # a load stuck in the file system
        started = time.monotonic()
        joined = await joined_within(0.3, work, threads)
        return joined, time.monotonic() - started

    try:
        joined, took = asyncio.run(run())  # the loop closes without waiting for the thread
    finally:
        release.set()
    assert joined is False and took < 5


def test_unfinished_work_is_left_after_the_bound_too() -> None:
    release = threading.Event()

    async def run() -> bool:
        threads = ThreadPoolExecutor(1)
        work = asyncio.get_running_loop().run_in_executor(threads, release.wait, 30)
        return await joined_within(0.2, work, threads)

    try:
        assert asyncio.run(run()) is False
    finally:
        release.set()


def test_the_grace_left_counts_from_the_drain() -> None:
    lifecycle = Lifecycle(10)
    assert lifecycle.grace_left() == 10
    lifecycle.begin_drain()
    assert 9 < lifecycle.grace_left() <= 10
