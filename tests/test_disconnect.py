"""A request whose client leaves is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from app.disconnect import unless_disconnected
from app.errors import ClientClosedRequest


class FakeRequest:
    def __init__(self, gone_after: int) -> None:
        self.polls = 0
        self.gone_after = gone_after

    async def is_disconnected(self) -> bool:
        self.polls += 1
        return self.polls > self.gone_after


def test_work_is_cancelled_when_the_client_leaves() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def work() -> str:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "done"

        with pytest.raises(ClientClosedRequest):
            await unless_disconnected(FakeRequest(gone_after=1), work())  # type: ignore[arg-type]
        assert cancelled.is_set()

    asyncio.run(scenario())


def test_work_finishes_while_the_client_stays() -> None:
    async def scenario() -> None:
        async def work() -> str:
            await asyncio.sleep(0.12)
            return "done"

        request = FakeRequest(gone_after=10**6)
        assert await unless_disconnected(request, work()) == "done"  # type: ignore[arg-type]
        assert request.polls >= 1

    asyncio.run(scenario())
