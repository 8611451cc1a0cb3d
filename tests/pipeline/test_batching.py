"""The cross-request batcher: who shares a pass, who waits, who is dropped, who fails."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest

from app.cam import CamInterrupted
from app.errors import InvalidParameter, Overloaded
from app.observability.context import start_request
from app.pipeline.admission import SlotLimiter
from app.pipeline.batching import Batcher, PassControl, RunPass
from app.pipeline.scheduling import TurnRules


class Recorder:
    """A pass function that records the items of each pass and can hold the first one."""

    def __init__(self, hold_first: bool = False) -> None:
        self.passes: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: Sequence[str], control: PassControl) -> list[str]:
        self.passes.append(list(items))
        self.started.set()
        self.release.wait(10)
        if any(item.startswith("bad") for item in items):
            raise InvalidParameter(f"cannot run {', '.join(i for i in items if i[:3] == 'bad')}")
        return [item.upper() for item in items]


async def _wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def _hold(batcher: Batcher, run: Recorder, name: str = "x") -> asyncio.Future:
    """Start a pass that keeps the model busy until ``run.release`` is set; its task."""
    first = asyncio.ensure_future(batcher.submit("k", name, 1, run))
    await _wait_until(run.started.is_set)
    return first


def _batcher(max_images: int = 8, timeout_s: float = 0.0, queue: int = 100) -> Batcher:
    return Batcher("m", SlotLimiter(max_running=2, max_waiting=queue), max_images, timeout_s)


def test_a_lone_request_on_an_idle_model_does_not_wait_for_the_timeout() -> None:
    async def scenario() -> None:
        batcher = _batcher(timeout_s=60.0)
        run = Recorder()
        result, info = await asyncio.wait_for(batcher.submit("k", "a", 1, run), timeout=10)
        assert result == "A" and info.batch_images == 1 and run.passes == [["a"]]
        await batcher.close()

    asyncio.run(scenario())


def test_requests_queued_behind_a_pass_share_the_next_one() -> None:
    async def scenario() -> None:
        batcher = _batcher(max_images=8)
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run, "first")
        others = [asyncio.ensure_future(batcher.submit("k", name, 1, run)) for name in "bcd"]
        other_key = asyncio.ensure_future(batcher.submit("other", "e", 1, run))
        await _wait_until(lambda: batcher.waiting == 4)
        run.release.set()
        assert (await first)[0] == "FIRST"
        answers = await asyncio.gather(*others)
        assert [result for result, _ in answers] == ["B", "C", "D"]
        assert all(info.batch_images == 3 for _, info in answers)
        assert (await other_key)[1].batch_images == 1
        assert run.passes == [["first"], ["b", "c", "d"], ["e"]]
        await batcher.close()

    asyncio.run(scenario())


def test_a_pass_holds_at_most_max_images() -> None:
    async def scenario() -> None:
        batcher = _batcher(max_images=4)
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run)
        # 3 + 2 images would exceed 4: the pass closes there, in arrival order (a later small
        # request does not overtake "two").
        tasks = [
            asyncio.ensure_future(batcher.submit("k", "three", 3, run)),
            asyncio.ensure_future(batcher.submit("k", "two", 2, run)),
            asyncio.ensure_future(batcher.submit("k", "one", 1, run)),
        ]
        await _wait_until(lambda: batcher.waiting == 3)
        run.release.set()
        await first
        infos = [info for _, info in await asyncio.gather(*tasks)]
        assert run.passes[1:] == [["three"], ["two", "one"]]
        assert [i.batch_images for i in infos] == [3, 3, 3]
        await batcher.close()

    asyncio.run(scenario())


def test_unbatchable_requests_run_alone() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run)
        tasks = [
            asyncio.ensure_future(batcher.submit("k", n, 1, run, batchable=False)) for n in "ab"
        ]
        await _wait_until(lambda: batcher.waiting == 2)
        run.release.set()
        await asyncio.gather(first, *tasks)
        assert run.passes == [["x"], ["a"], ["b"]]
        await batcher.close()

    asyncio.run(scenario())


def test_batch_size_one_turns_batching_off() -> None:
    async def scenario() -> None:
        batcher = _batcher(max_images=1)
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run)
        tasks = [asyncio.ensure_future(batcher.submit("k", n, 1, run)) for n in "ab"]
        await _wait_until(lambda: batcher.waiting == 2)
        run.release.set()
        await asyncio.gather(first, *tasks)
        assert run.passes == [["x"], ["a"], ["b"]]
        await batcher.close()

    asyncio.run(scenario())


def test_a_forming_batch_waits_for_company_until_the_timeout() -> None:
    async def scenario() -> None:
        batcher = _batcher(max_images=8, timeout_s=0.5)
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run)
        early = asyncio.ensure_future(batcher.submit("k", "early", 1, run))
        await _wait_until(lambda: batcher.waiting == 1)
        run.release.set()
        await first
        # "early" queued behind a pass, so its batch is forming: a newcomer within the
        # timeout joins it.
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit("k", "late", 1, run))
        await asyncio.gather(early, late)
        assert run.passes == [["x"], ["early", "late"]]
        await batcher.close()

    asyncio.run(scenario())


def test_a_request_cancelled_before_its_pass_is_dropped() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run)
        gone = asyncio.ensure_future(batcher.submit("k", "gone", 1, run))
        stays = asyncio.ensure_future(batcher.submit("k", "stays", 1, run))
        await _wait_until(lambda: batcher.waiting == 2)
        gone.cancel()  # what a client disconnect does to its request
        await asyncio.gather(gone, return_exceptions=True)
        assert batcher.waiting == 1
        run.release.set()
        await asyncio.gather(first, stays)
        assert run.passes == [["x"], ["stays"]]
        assert batcher.limiter.in_flight == 0
        await batcher.close()

    asyncio.run(scenario())


def test_a_request_that_breaks_a_batch_fails_alone() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        run = Recorder(hold_first=True)
        first = await _hold(batcher, run)
        tasks = [asyncio.ensure_future(batcher.submit("k", n, 1, run)) for n in ("a", "bad", "c")]
        await _wait_until(lambda: batcher.waiting == 3)
        run.release.set()
        await first
        good_a, failed, good_c = await asyncio.gather(*tasks, return_exceptions=True)
        assert good_a[0] == "A" and good_c[0] == "C"  # type: ignore[index]
        assert isinstance(failed, InvalidParameter) and "bad" in failed.message
        assert run.passes[1:] == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
        await batcher.close()

    asyncio.run(scenario())


class Chunked:
    """A pass of ``chunks`` chunks that reports progress and honours the stop check."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.ran = 0
        self.started = threading.Event()
        self.step = threading.Semaphore(0)

    def __call__(self, items: Sequence[str], control: PassControl) -> list[str]:
        self.started.set()
        for chunk in range(self.chunks):
            self.step.acquire(timeout=10)
            self.ran += 1
            control.progress(chunk + 1, self.chunks)
            if control.should_stop():
                raise CamInterrupted("stopped")
        return [item.upper() for item in items]


def test_a_running_pass_stops_at_its_next_chunk_once_its_caller_is_gone() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        run = Chunked(chunks=100)
        heard: list[tuple[int, int]] = []
        task = asyncio.ensure_future(
            batcher.submit("k", "a", 1, run, progress=lambda d, t: heard.append((d, t)))
        )
        await _wait_until(run.started.is_set)
        run.step.release(2)
        await _wait_until(lambda: len(heard) == 3)
        task.cancel()  # what a disconnect, a deadline or a job's DELETE does
        await asyncio.gather(task, return_exceptions=True)
        run.step.release(100)
        await _wait_until(lambda: batcher._worker is not None and not batcher.waiting)
        await asyncio.sleep(0.05)
        assert run.ran == 3  # the chunk under way when the caller left ends the pass
        assert heard == [(0, 0), (1, 100), (2, 100)]  # start, chunks; nothing after leaving
        assert batcher.limiter.in_flight == 0
        # The model is free again for the next request.
        result, _ = await asyncio.wait_for(batcher.submit("k", "b", 1, Recorder()), 10)
        assert result == "B"
        await batcher.close()

    asyncio.run(scenario())


def test_a_shared_pass_goes_on_while_one_of_its_callers_remains() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        hold = Recorder(hold_first=True)
        first = await _hold(batcher, hold)
        run = Chunked(chunks=3)
        leaves = asyncio.ensure_future(batcher.submit("k", "a", 1, run))
        stays = asyncio.ensure_future(batcher.submit("k", "b", 1, run))
        await _wait_until(lambda: batcher.waiting == 2)
        hold.release.set()
        await first
        await _wait_until(run.started.is_set)
        leaves.cancel()
        await asyncio.gather(leaves, return_exceptions=True)
        run.step.release(3)
        result, info = await asyncio.wait_for(stays, 10)
        assert result == "B" and info.batch_images == 2 and run.ran == 3
        await batcher.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- turns


class Turns:
    """A chunked pass: ``chunks`` chunks, each waiting for the test's go, a boundary after each."""

    def __init__(self, log: list[str], name: str, chunks: int = 3) -> None:
        self.log, self.name, self.chunks = log, name, chunks
        self.go = [threading.Event() for _ in range(chunks)]
        self.waiting = threading.Event()

    def __call__(self, items: Sequence[str], control: PassControl) -> list[str]:
        for number, go in enumerate(self.go):
            self.waiting.set()
            go.wait(10)
            self.log.append(f"{self.name}{number}")
            if control.at_boundary():
                raise CamInterrupted(f"stopped after chunk {number}")
        return [item.upper() for item in items]


class Short:
    """A short pass that logs the items it ran."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __call__(self, items: Sequence[str], control: PassControl) -> list[str]:
        self.log.append("+".join(items))
        return [item.upper() for item in items]


def test_a_short_request_runs_at_the_next_chunk_boundary_not_after_the_long_pass() -> None:
    async def scenario() -> None:
        waits: list[tuple[str, float]] = []
        yields: list[int] = []
        batcher = Batcher(
            "m",
            SlotLimiter(max_running=1, max_waiting=10),
            8,
            0.0,
            on_wait=lambda priority, s: waits.append((priority, s)),
            on_yield=lambda: yields.append(1),
        )
        log: list[str] = []
        long = Turns(log, "job")
        job = asyncio.ensure_future(
            batcher.submit("s", "j", 1, long, False, priority="background", chunked=True)
        )
        await _wait_until(long.waiting.is_set)
        # One slot only, and the job holds it: the short pass still runs, on the job's thread.
        short = asyncio.ensure_future(batcher.submit("k", "a", 1, Short(log)))
        await asyncio.sleep(0.05)
        assert not short.done() and log == []  # nothing runs inside a chunk
        assert batcher.waiting == 1  # offered to the job, waiting for its boundary
        long.go[0].set()
        result, info = await asyncio.wait_for(short, 10)
        assert (result, info.guest) == ("A", True)
        assert log == ["job0", "a"] and not job.done()  # the job is still at its second chunk
        for go in long.go[1:]:
            go.set()
        assert (await asyncio.wait_for(job, 10))[0] == "J"
        assert log == ["job0", "a", "job1", "job2"]
        assert yields == [1]
        assert sorted(priority for priority, _ in waits) == ["background", "interactive"]
        await batcher.close()

    asyncio.run(scenario())


class Halves:
    """A chunked pass of one chunk in two halves, with a pause inside the chunk between them
    (where an engine's forward pauses before a layer), each half waiting for the test's go."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.go = [threading.Event(), threading.Event()]
        self.waiting = threading.Event()

    def __call__(self, items: Sequence[str], control: PassControl) -> list[str]:
        self.waiting.set()
        self.go[0].wait(10)
        self.log.append("first half")
        control.at_pause()
        self.go[1].wait(10)
        self.log.append("second half")
        control.at_boundary()
        return [item.upper() for item in items]


@pytest.mark.parametrize(
    ("pause_in_forwards", "order"),
    [
        (True, ["first half", "a", "second half"]),
        (False, ["first half", "second half", "a"]),
    ],
)
def test_a_short_request_runs_at_a_pause_inside_the_chunk_unless_pauses_are_off(
    pause_in_forwards: bool, order: list[str]
) -> None:
    async def scenario() -> None:
        batcher = Batcher(
            "m",
            SlotLimiter(max_running=1, max_waiting=10),
            8,
            0.0,
            turns=TurnRules(pauses=pause_in_forwards),
        )
        log: list[str] = []
        long = Halves(log)
        job = asyncio.ensure_future(
            batcher.submit("s", "j", 1, long, False, priority="background", chunked=True)
        )
        await _wait_until(long.waiting.is_set)
        short = asyncio.ensure_future(batcher.submit("k", "a", 1, Short(log)))
        await _wait_until(lambda: batcher.waiting == 1)  # offered to the job
        long.go[0].set()
        if pause_in_forwards:
            result, info = await asyncio.wait_for(short, 10)
            assert (result, info.guest) == ("A", True)
            assert not job.done()  # answered before the chunk's second half
        long.go[1].set()
        await asyncio.wait_for(asyncio.gather(job, short), 10)
        assert log == order
        await batcher.close()

    asyncio.run(scenario())


def test_the_host_and_its_guests_know_their_clients() -> None:
    """A job's pass hosts as the client that submitted it, and a guest names its requests'
    clients (the share fair among clients, ``app.pipeline.scheduling``)."""

    async def as_client(caller: str, work: Coroutine[Any, Any, Any]) -> Any:
        start_request(None).caller = caller  # this task's own context
        return await work

    async def scenario() -> None:
        batcher = Batcher("m", SlotLimiter(max_running=1, max_waiting=10), 8, 0.0)
        log: list[str] = []
        long = Halves(log)
        job = asyncio.ensure_future(
            as_client(
                "key:batch",
                batcher.submit("s", "j", 1, long, False, priority="background", chunked=True),
            )
        )
        await _wait_until(long.waiting.is_set)
        short = asyncio.ensure_future(
            as_client("address:198.51.100.7", batcher.submit("k", "a", 1, Short(log)))
        )
        await _wait_until(lambda: batcher.waiting == 1)
        host = batcher._host
        assert host is not None and host.caller == "key:batch"
        assert list(host._guests[0].callers()) == ["address:198.51.100.7"]
        for go in long.go:
            go.set()
        await asyncio.wait_for(asyncio.gather(job, short), 10)
        await batcher.close()

    asyncio.run(scenario())


def test_requests_that_arrive_while_a_guest_waits_for_its_turn_join_it() -> None:
    async def scenario() -> None:
        batcher = _batcher(max_images=3)
        log: list[str] = []
        long = Turns(log, "job", 2)
        job = asyncio.ensure_future(
            batcher.submit("s", "j", 1, long, False, priority="background", chunked=True)
        )
        await _wait_until(long.waiting.is_set)
        run = Short(log)
        first = asyncio.ensure_future(batcher.submit("k", "a", 1, run))
        await _wait_until(lambda: batcher.waiting == 1)  # offered, waiting for the boundary
        later = [
            asyncio.ensure_future(batcher.submit(key, name, 1, run))
            for key, name in (("k", "b"), ("other", "x"), ("k", "c"), ("k", "d"))
        ]
        await _wait_until(lambda: batcher.waiting == 5)
        for go in long.go:
            go.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *later), 10)
        await asyncio.wait_for(job, 10)
        # a, b and c shared one guest pass (at most 3 images); x and d went in later ones.
        assert log[:2] == ["job0", "a+b+c"]
        assert sorted(log[2:]) == ["d", "job1", "x"]
        assert [info.batch_images for _, info in answers] == [3, 3, 1, 3, 1]
        await batcher.close()

    asyncio.run(scenario())


def test_waiting_interactive_work_goes_first_and_batches_within_its_class() -> None:
    async def scenario() -> None:
        batcher = _batcher(max_images=8)
        log: list[str] = []
        hold = Recorder(hold_first=True)
        first = await _hold(batcher, hold)
        run = Short(log)
        submitted = [
            asyncio.ensure_future(batcher.submit("k", name, 1, run, priority=priority))
            for name, priority in (
                ("b1", "background"),
                ("i1", "interactive"),
                ("b2", "background"),
                ("i2", "interactive"),
            )
        ]
        await asyncio.sleep(0.05)
        hold.release.set()
        await asyncio.wait_for(asyncio.gather(first, *submitted), 10)
        assert log == ["i1+i2", "b1+b2"]
        await batcher.close()

    asyncio.run(scenario())


def test_a_second_chunked_pass_waits_for_the_first_while_short_ones_go_between() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        log: list[str] = []
        one, two = Turns(log, "one", 2), Turns(log, "two", 1)
        first = asyncio.ensure_future(batcher.submit("s", "x", 1, one, False, chunked=True))
        await _wait_until(one.waiting.is_set)
        second = asyncio.ensure_future(batcher.submit("s", "y", 1, two, False, chunked=True))
        short = asyncio.ensure_future(batcher.submit("k", "a", 1, Short(log)))
        await asyncio.sleep(0.05)
        one.go[0].set()
        await asyncio.wait_for(short, 10)
        assert not two.waiting.is_set()  # not started beside the first one
        one.go[1].set()
        two.go[0].set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert log == ["one0", "a", "one1", "two0"]
        await batcher.close()

    asyncio.run(scenario())


def test_a_guest_whose_caller_left_does_not_run_and_the_host_goes_on() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        log: list[str] = []
        long = Turns(log, "job", 2)
        job = asyncio.ensure_future(batcher.submit("s", "j", 1, long, False, chunked=True))
        await _wait_until(long.waiting.is_set)
        short = asyncio.ensure_future(batcher.submit("k", "a", 1, Short(log)))
        await asyncio.sleep(0.05)
        short.cancel()
        await asyncio.sleep(0)
        for go in long.go:
            go.set()
        assert (await asyncio.wait_for(job, 10))[0] == "J"
        assert log == ["job0", "job1"]
        await batcher.close()

    asyncio.run(scenario())


def test_a_cancelled_host_serves_its_waiting_guests_then_stops_at_that_boundary() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        log: list[str] = []
        long = Turns(log, "job", 3)
        job = asyncio.ensure_future(
            batcher.submit("s", "j", 1, long, False, priority="background", chunked=True)
        )
        await _wait_until(long.waiting.is_set)
        short = asyncio.ensure_future(batcher.submit("k", "a", 1, Short(log)))
        await asyncio.sleep(0.05)
        job.cancel()
        await asyncio.sleep(0.05)
        long.go[0].set()
        assert (await asyncio.wait_for(short, 10))[0] == "A"
        await _wait_until(lambda: not batcher._hosting)
        assert log == ["job0", "a"]  # no second chunk ran
        await batcher.close()

    asyncio.run(scenario())


async def _admitted(batcher: Batcher, caller: str, name: str, run: RunPass) -> str:
    """A request of ``caller`` as the explainer sends one: admitted, then submitted alone."""
    with batcher.limiter.admit(caller):
        result, _ = await batcher.submit(name, name, 1, run, batchable=False)
        return str(result)


def test_turns_go_round_robin_among_clients_within_a_class() -> None:
    async def scenario() -> None:
        batcher = _batcher()
        log: list[str] = []
        hold = Recorder(hold_first=True)
        first = await _hold(batcher, hold)
        run = Short(log)
        submitted = []
        for caller, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1")]:
            submitted.append(asyncio.ensure_future(_admitted(batcher, caller, name, run)))
            await asyncio.sleep(0.01)  # arrival order as listed
        submitted.append(
            asyncio.ensure_future(batcher.submit("j", "j1", 1, run, priority="background"))
        )
        await asyncio.sleep(0.05)
        hold.release.set()
        await asyncio.wait_for(asyncio.gather(first, *submitted), 10)
        # each client's first waiting request, oldest first, then each one's second...; the
        # background class after every interactive request
        assert log == ["a1", "b1", "c1", "a2", "a3", "j1"]
        await batcher.close()

    asyncio.run(scenario())


def test_a_displaced_request_leaves_the_queue_and_the_newcomer_runs() -> None:
    async def scenario() -> None:
        batcher = Batcher("m", SlotLimiter(max_running=1, max_waiting=2), 8, 0.0)
        log: list[str] = []
        hold = Recorder(hold_first=True)
        first = asyncio.ensure_future(_admitted(batcher, "a", "a0", hold))
        await _wait_until(hold.started.is_set)
        run = Short(log)
        a1 = asyncio.ensure_future(_admitted(batcher, "a", "a1", run))
        a2 = asyncio.ensure_future(_admitted(batcher, "a", "a2", run))
        await _wait_until(lambda: batcher.waiting == 2)
        b1 = asyncio.ensure_future(_admitted(batcher, "b", "b1", run))
        with pytest.raises(Overloaded, match="gave its place"):
            await asyncio.wait_for(a2, 10)
        assert batcher.limiter.in_flight == 3 and batcher.waiting == 2
        hold.release.set()
        assert await asyncio.wait_for(asyncio.gather(first, a1, b1), 10) == ["A0", "A1", "B1"]
        assert log == ["a1", "b1"] and batcher.limiter.in_flight == 0
        await batcher.close()

    asyncio.run(scenario())
