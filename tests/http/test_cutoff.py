"""A synchronous request is cancelled when its client leaves, its deadline passes or the
shutdown grace runs out."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import ClientClosedRequest, RequestTimeout, ShuttingDown
from app.http.cutoff import guarded
from app.lifecycle import Lifecycle


class FakeRequest:
    def __init__(self, gone_after: int) -> None:
        self.polls = 0
        self.gone_after = gone_after

    async def is_disconnected(self) -> bool:
        self.polls += 1
        return self.polls > self.gone_after


async def _cancellable(cancelled: asyncio.Event) -> str:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return "done"


def test_work_is_cancelled_when_the_client_leaves() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()
        with pytest.raises(ClientClosedRequest):
            await guarded(FakeRequest(gone_after=1), _cancellable(cancelled))  # type: ignore[arg-type]
        assert cancelled.is_set()

    asyncio.run(scenario())


def test_work_finishes_while_the_client_stays() -> None:
    async def scenario() -> None:
        async def work() -> str:
            await asyncio.sleep(0.12)
            return "done"

        request = FakeRequest(gone_after=10**6)
        assert await guarded(request, work()) == "done"  # type: ignore[arg-type]
        assert request.polls >= 1

    asyncio.run(scenario())


def test_work_past_its_deadline_is_cancelled_with_a_timeout_naming_jobs() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()
        request = FakeRequest(gone_after=10**6)
        with pytest.raises(RequestTimeout) as caught:
            await guarded(request, _cancellable(cancelled), timeout_s=0.1)  # type: ignore[arg-type]
        assert cancelled.is_set()
        assert caught.value.status_code == 504 and caught.value.code == "timeout"
        assert "/jobs" in caught.value.message

    asyncio.run(scenario())


def test_the_shutdown_cut_stops_work_and_the_drain_counts_it() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()
        lifecycle = Lifecycle(grace_s=0.0)

        async def request() -> str:
            with lifecycle.track():  # what the gate does for a model route's POST
                return await guarded(
                    FakeRequest(10**6),  # type: ignore[arg-type]
                    _cancellable(cancelled),
                    lifecycle=lifecycle,
                )

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        assert lifecycle.in_flight == 1
        lifecycle.begin_drain()
        assert lifecycle.ready_to_exit() is False  # grace over: this call cuts
        assert lifecycle.cut.is_set()
        with pytest.raises(ShuttingDown):
            await task
        assert cancelled.is_set() and lifecycle.in_flight == 0
        assert lifecycle.ready_to_exit() is True

    asyncio.run(scenario())


def test_a_drain_with_nothing_in_flight_ends_at_once() -> None:
    lifecycle = Lifecycle(grace_s=30.0)
    assert lifecycle.ready_to_exit() is False  # not draining
    lifecycle.begin_drain()
    assert lifecycle.ready_to_exit() is True
    assert not lifecycle.cut.is_set()
