"""A synchronous request is cancelled when its client leaves, its deadline passes or the
shutdown grace runs out."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import ClientClosedRequest, RequestTimeout, ShuttingDown
from app.http.cutoff import guarded
from app.lifecycle import Lifecycle


class FakeRequest:
    """A request whose connection's next ASGI message is ``http.disconnect`` after
    ``gone_after_s`` (None: never), after ``leftovers`` body messages the route left unread."""

    def __init__(self, gone_after_s: float | None, leftovers: int = 0) -> None:
        self.gone_after_s = gone_after_s
        self.leftovers = leftovers
        self.reads = 0

    async def receive(self) -> dict[str, object]:
        self.reads += 1
        if self.leftovers:
            self.leftovers -= 1
            return {"type": "http.request", "body": b"x", "more_body": True}
        if self.gone_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.gone_after_s or 0)
        return {"type": "http.disconnect"}


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
            await guarded(FakeRequest(0.05, leftovers=2), _cancellable(cancelled))  # type: ignore[arg-type]
        assert cancelled.is_set()

    asyncio.run(scenario())


def test_work_finishes_while_the_client_stays() -> None:
    async def scenario() -> None:
        async def work() -> str:
            await asyncio.sleep(0.12)
            return "done"

        request = FakeRequest(None)
        assert await guarded(request, work()) == "done"  # type: ignore[arg-type]
        assert request.reads == 1  # one read waits for the disconnect: nothing polls

    asyncio.run(scenario())


def test_work_past_its_deadline_is_cancelled_with_a_timeout_naming_jobs() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()
        request = FakeRequest(None)
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
                    FakeRequest(None),  # type: ignore[arg-type]
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


def test_nothing_is_left_waiting_once_the_work_is_done() -> None:
    """The disconnect reader and the shutdown's wait end with the request (no task leaks)."""

    async def scenario() -> None:
        async def work() -> str:
            return "done"

        before = len(asyncio.all_tasks())
        lifecycle = Lifecycle(grace_s=0.0)
        for _ in range(20):
            assert await guarded(FakeRequest(None), work(), lifecycle=lifecycle) == "done"  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the cancelled waits run their cancellation
        assert len(asyncio.all_tasks()) == before

    asyncio.run(scenario())
