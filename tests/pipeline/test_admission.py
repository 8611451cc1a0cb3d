"""The slot limiter bounds concurrent model work, refuses requests beyond its queue, and
takes a place back from the client holding the most for a client holding fewer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from app.errors import Overloaded
from app.observability.context import start_request
from app.pipeline.admission import SlotLimiter, Ticket, current_ticket


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


# ---------------------------------------------------------------------------- fair among clients


class Held:
    """Requests admitted and kept open until ``close`` (the fixture closes it after the test)."""

    def __init__(self, limiter: SlotLimiter) -> None:
        self.limiter = limiter
        self.stack = ExitStack()

    def waiting(self, caller: str, answers: list[Exception] | None = None) -> Ticket:
        """Admit one request of ``caller`` whose work waits in a queue; a displacement lands
        in ``answers``."""
        ticket = self.stack.enter_context(self.limiter.admit(caller))
        ticket.queued(object(), (answers if answers is not None else []).append)
        return ticket

    def started(self, caller: str) -> Ticket:
        """Admit one request of ``caller`` whose first pass has started."""
        ticket = self.waiting(caller)
        ticket.dequeued(next(iter(ticket.waiting)), into_pass=True)
        return ticket

    def decoding(self, caller: str) -> Ticket:
        """Admit one request of ``caller`` with nothing queued yet."""
        return self.stack.enter_context(self.limiter.admit(caller))

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def holding() -> Iterator[Callable[..., Held]]:
    """``holding(max_running, max_waiting, on_displace=None)``: a limiter whose admitted
    requests end with the test."""
    made: list[Held] = []

    def factory(max_running: int, max_waiting: int, **kwargs: object) -> Held:
        made.append(Held(SlotLimiter(max_running, max_waiting, **kwargs)))  # type: ignore[arg-type]
        return made[-1]

    yield factory
    for held in reversed(made):
        held.close()


def test_one_client_alone_may_take_every_place(holding: Callable[..., Held]) -> None:
    held = holding(1, 3)
    answers: list[Exception] = []
    for _ in range(4):
        held.waiting("address:a", answers)
    assert held.limiter.in_flight == 4 and held.limiter.held_by("address:a") == 4
    with pytest.raises(Overloaded, match="busy"):  # its own fifth: nobody to take from
        held.waiting("address:a", answers)
    assert answers == []
    held.close()
    assert held.limiter.in_flight == 0 and held.limiter.held_by("address:a") == 0


def test_a_full_service_takes_the_heaviest_clients_newest_waiting_place(
    holding: Callable[..., Held],
) -> None:
    displaced: list[int] = []
    held = holding(1, 3, on_displace=lambda: displaced.append(1))
    answers: dict[int, list[Exception]] = {i: [] for i in range(4)}
    tickets = [held.waiting("address:a", answers[i]) for i in range(4)]
    with held.limiter.admit("address:b"):
        # a's newest waiting request was answered 503 and its place is b's: the count stays
        # within the bound
        assert [len(answers[i]) for i in range(4)] == [0, 0, 0, 1]
        error = answers[3][0]
        assert isinstance(error, Overloaded) and "gave its place" in str(error)
        assert "4 of 4" in str(error) and int(error.headers["Retry-After"]) >= 1
        assert tickets[3].released and not tickets[3].waiting
        assert held.limiter.in_flight == 4 and held.limiter.held_by("address:a") == 3
        assert held.limiter.held_by("address:b") == 1 and displaced == [1]
    assert held.limiter.in_flight == 3 and held.limiter.held_by("address:b") == 0
    held.close()  # the displaced request's own block ends too: no place freed twice
    assert held.limiter.in_flight == 0 and held.limiter.held_by("address:a") == 0


def test_no_place_is_taken_from_a_client_holding_fewer_than_two_more(
    holding: Callable[..., Held],
) -> None:
    held = holding(1, 2)
    answers: list[Exception] = []
    held.waiting("a", answers)
    held.waiting("a", answers)
    held.waiting("b", answers)
    # a holds 2, b holds 1: taking one of a's would only swap who is ahead
    with pytest.raises(Overloaded, match="busy"):
        held.waiting("b", answers)
    assert answers == [] and held.limiter.in_flight == 3


def test_the_most_holding_client_gives_first_and_ties_skip_to_the_next(
    holding: Callable[..., Held],
) -> None:
    held = holding(1, 6)
    a_answers: list[Exception] = []
    c_answers: list[Exception] = []
    held.waiting("a", a_answers)
    held.waiting("a", a_answers)
    for _ in range(4):
        held.started("c")  # c holds the most, but every one of its requests has started
    held.waiting("b")
    assert held.limiter.in_flight == 7
    # b (1) -> c has nothing displaceable; a holds 2 < 1 + 2: refused
    with pytest.raises(Overloaded, match="busy"):
        held.waiting("b")
    # d (0) -> c has nothing displaceable; a holds 2 >= 0 + 2: a's newest gives its place
    held.waiting("d")
    assert len(a_answers) == 1 and c_answers == [] and held.limiter.held_by("a") == 1


def test_work_that_started_or_is_still_decoding_is_never_displaced(
    holding: Callable[..., Held],
) -> None:
    held = holding(1, 2)
    for _ in range(3):
        held.started("a")
    with pytest.raises(Overloaded, match="busy"):
        held.waiting("b")
    held = holding(1, 1)
    held.decoding("a")
    held.decoding("a")
    with pytest.raises(Overloaded, match="busy"):
        held.decoding("b")


def test_the_caller_defaults_to_the_current_requests_client() -> None:
    async def scenario() -> None:
        start_request(None).caller = "key:alice"
        limiter = SlotLimiter(max_running=1, max_waiting=0)
        with limiter.admit() as ticket:
            assert ticket.caller == "key:alice" and limiter.held_by("key:alice") == 1
            assert current_ticket() is ticket
        assert current_ticket() is None

    asyncio.run(scenario())
