"""The memory budget: a FIFO weighted semaphore that never lets more than its capacity be held."""

from __future__ import annotations

import asyncio

import pytest

from app.pipeline.budget import MemoryBudget


def test_holders_never_exceed_the_capacity_and_go_in_order() -> None:
    async def main() -> tuple[list[int], list[str]]:
        budget = MemoryBudget(10)
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
        budget = MemoryBudget(10)
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


async def _hold(budget: MemoryBudget, amount: int) -> None:
    async with budget.hold(amount):
        await asyncio.sleep(0)


def test_more_than_the_capacity_is_refused() -> None:
    async def main() -> None:
        async with MemoryBudget(10).hold(11):
            pass

    with pytest.raises(ValueError, match="exceed the budget"):
        asyncio.run(main())
