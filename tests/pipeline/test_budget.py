"""The memory budget: a weighted semaphore that never lets more than its capacity be held,
serving its waiters in turn, round robin among clients."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.observability.context import start_request
from app.pipeline.budget import Budget, FairThreads


def test_holders_never_exceed_the_capacity_and_go_in_order() -> None:
    async def main() -> tuple[list[int], list[str]]:
        budget = Budget(10)
        peaks: list[int] = []
        order: list[str] = []

        async def user(name: str, amount: int) -> None:
            async with budget.hold(amount):
                order.append(name)
                peaks.append(budget.held)
                await asyncio.sleep(0.01)

        await asyncio.gather(user("a", 6), user("b", 6), user("c", 2), user("d", 10), user("e", 1))
        assert budget.held == 0 and budget.waiting == 0
        return peaks, order

    peaks, order = asyncio.run(main())
    assert max(peaks) <= 10
    assert order == ["a", "b", "c", "d", "e"]  # c waits behind b although it would fit


def test_a_cancelled_waiter_gives_its_place_back() -> None:
    async def main() -> None:
        budget = Budget(10)
        async with budget.hold(8):
            big = asyncio.create_task(_hold(budget, 9))
            await asyncio.sleep(0)
            small = asyncio.create_task(_hold(budget, 2))
            await asyncio.sleep(0)
            assert budget.waiting == 2
            big.cancel()
            await asyncio.gather(big, return_exceptions=True)
            await asyncio.wait_for(small, 1)  # fits beside the 8 once the 9 is gone
        assert budget.held == 0 and budget.waiting == 0

    asyncio.run(main())


async def _hold(budget: Budget, amount: int) -> None:
    async with budget.hold(amount):
        await asyncio.sleep(0)


def test_more_than_the_capacity_is_refused() -> None:
    async def main() -> None:
        async with Budget(10).hold(11):
            pass

    with pytest.raises(ValueError, match="exceed the budget"):
        asyncio.run(main())


def test_turns_go_round_robin_among_clients() -> None:
    async def main() -> list[str]:
        budget = Budget(10)
        order: list[str] = []
        release = asyncio.Event()

        async def user(name: str, client: str, amount: int) -> None:
            async with budget.hold(amount, client):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(user("a0", "a", 8))
        await asyncio.sleep(0)
        waiting = []
        for name, client, amount in [
            ("a1", "a", 6),
            ("a2", "a", 6),
            ("a3", "a", 6),
            ("b1", "b", 2),
            ("c1", "c", 6),
        ]:
            waiting.append(asyncio.create_task(user(name, client, amount)))
            await asyncio.sleep(0)
        assert budget.waiting == 4 and order == ["a0", "b1"]
        release.set()  # everything holds only until the release: turns decide the order
        await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
        assert budget.held == 0 and budget.waiting == 0
        return order

    # Weighed by bytes: b1 (2) ends before a1 (6), and fits beside a0 at once; c1 then goes
    # with a's next. Before, b1 and c1 waited behind every one of a's.
    assert asyncio.run(main()) == ["a0", "b1", "a1", "c1", "a2", "a3"]


def test_the_client_defaults_to_the_current_requests() -> None:
    async def main() -> list[str]:
        budget = Budget(10)
        order: list[str] = []

        async def user(name: str, client: str) -> None:
            start_request(None).caller = client  # in this task's own context
            async with budget.hold(10):
                order.append(name)
                await asyncio.sleep(0.01)

        tasks = []
        for name, client in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]:
            tasks.append(asyncio.create_task(user(name, client)))
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(main()) == ["a1", "a2", "b1", "a3"]  # before: b1 last


def test_fair_threads_run_a_light_task_of_another_client_before_heavy_queued_ones() -> None:
    async def main() -> list[str]:
        order: list[str] = []
        release = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as pool:
            threads = FairThreads(pool)

            def work(name: str) -> None:
                if name == "a0":
                    release.wait(5)
                order.append(name)

            async def task(name: str, client: str, cost: int) -> None:
                start_request(None).caller = client
                await threads.run(lambda: work(name), cost)

            tasks = []
            for name, client, cost in [
                ("a0", "a", 100),
                ("a1", "a", 100),
                ("a2", "a", 100),
                ("b1", "b", 1),
            ]:
                tasks.append(asyncio.create_task(task(name, client, cost)))
                await asyncio.sleep(0.01)
            release.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    # first come first served in the pool's own queue would be a0, a1, a2, b1
    assert asyncio.run(main()) == ["a0", "b1", "a1", "a2"]


def test_fair_threads_of_a_pool_of_unknown_size_run_at_once() -> None:
    async def main() -> int:
        return await FairThreads(None).run(lambda: 7)

    assert asyncio.run(main()) == 7


def test_a_client_working_step_after_step_gets_every_other_turn_beside_a_flood() -> None:
    # One unit (a thread): a has twelve one-step holders waiting, b one request of six steps,
    # each asked for only once its last one ended (by then the unit went to a's next). b's
    # next step starts where the clock was when its last one left: one turn in two, not three.
    async def main() -> list[str]:
        budget = Budget(1)
        order: list[str] = []
        release = asyncio.Event()

        async def step(client: str) -> None:
            async with budget.hold(1, client):
                order.append(client)
                await release.wait()
                await asyncio.sleep(0)

        async def steps(client: str, count: int) -> None:
            for _ in range(count):
                await step(client)

        tasks = []
        for _ in range(12):
            tasks.append(asyncio.create_task(step("a")))
            await asyncio.sleep(0)
        tasks.append(asyncio.create_task(steps("b", 6)))
        await asyncio.sleep(0)
        assert budget.waiting == 12  # a's first holds the unit
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    order = asyncio.run(main())
    b = [i for i, client in enumerate(order) if client == "b"]
    # from its first step on, every other one (before: b's steps came at 2, 5, 8, ...)
    assert len(b) == 6 and b[-1] - b[0] == 10 and b[0] <= 2, " ".join(order)
