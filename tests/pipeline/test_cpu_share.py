"""The CPU share: the service's CPU work in flight, and the intra-op team a pass takes from it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest
import torch

from app.pipeline.admission import SlotLimiter
from app.pipeline.batching import Batcher, PassControl
from app.pipeline.cpu_share import LASTING_S, CountedThreads, CpuShare, fit_of


@pytest.fixture(autouse=True)
def _torch_threads_kept() -> Iterator[None]:
    """``torch.set_num_threads`` also sets the count that new threads start with: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _busy(threads: CountedThreads, count: int) -> tuple[threading.Event, list]:
    """``count`` counted tasks that run until the returned event is set."""
    release = threading.Event()
    started = threading.Barrier(count + 1)

    def hold() -> None:
        started.wait(10)
        release.wait(10)

    futures = [threads.submit(hold) for _ in range(count)]
    started.wait(10)
    return release, futures


def test_the_team_is_every_core_alone_and_what_the_other_work_leaves_beside_it() -> None:
    share = CpuShare(cores=4)
    assert share.team() == 4  # nothing counted: a pass off the counted threads takes them all
    with CountedThreads(share, max_workers=4) as threads:
        assert threads.submit(share.team).result(10) == 4  # alone
        release, futures = _busy(threads, 2)
        assert share.running == 2
        assert threads.submit(share.team).result(10) == 2  # beside two other tasks
        release.set()
        for future in futures:
            future.result(10)
    assert share.running == 0


def test_the_team_never_falls_below_one_thread() -> None:
    share = CpuShare(cores=2)
    with CountedThreads(share, max_workers=4) as threads:
        release, futures = _busy(threads, 3)
        assert threads.submit(share.team).result(10) == 1
        release.set()
        for future in futures:
            future.result(10)


def test_a_task_that_fails_is_no_longer_counted() -> None:
    share = CpuShare(cores=2)

    def fail() -> None:
        raise RuntimeError("broken")

    with CountedThreads(share, max_workers=1) as threads:
        with pytest.raises(RuntimeError, match="broken"):
            threads.submit(fail).result(10)
    assert share.running == 0


def test_fit_sizes_the_calling_threads_torch_team() -> None:
    share = CpuShare(cores=2)

    def fitted(priority: str = "interactive") -> int:
        share.fit(priority)  # type: ignore[arg-type]
        return torch.get_num_threads()

    with CountedThreads(share, max_workers=3) as threads:
        assert threads.submit(fitted).result(10) == 2
        release, futures = _busy(threads, 1)
        assert threads.submit(fitted).result(10) == 1
        release.set()
        for future in futures:
            future.result(10)
        assert threads.submit(fitted).result(10) == 2  # wide again once the other work ended


def test_a_job_gives_a_core_only_to_work_that_lasts() -> None:
    """A background pass counts the other tasks that have run for LASTING_S: a request's few
    milliseconds of decoding or drawing do not narrow it, a drawing of seconds does."""
    now = [100.0]
    share = CpuShare(cores=2, clock=lambda: now[0])
    with CountedThreads(share, max_workers=2) as threads:
        release, futures = _busy(threads, 1)
        assert threads.submit(share.team, "background").result(10) == 2  # just started
        assert threads.submit(share.team, "interactive").result(10) == 1
        now[0] += 2 * LASTING_S
        assert threads.submit(share.team, "background").result(10) == 1  # it lasts
        release.set()
        for future in futures:
            future.result(10)
        assert threads.submit(share.team, "background").result(10) == 2


def test_only_counted_threads_have_a_fit() -> None:
    share = CpuShare(cores=2)
    with CountedThreads(share, max_workers=1) as counted:
        assert fit_of(counted) == share.fit
    assert fit_of(None) is None


def test_a_pass_and_its_chunks_take_the_team_the_other_work_leaves() -> None:
    """Through the batcher: the pass fits its team when it starts and again at each boundary
    and pause, so a long pass narrows when other work starts beside it and widens after."""
    share = CpuShare(cores=2)
    teams: dict[str, int] = {}
    other_started, other_release = threading.Event(), threading.Event()

    def run(items: Sequence[str], control: PassControl) -> list[str]:
        teams["start"] = torch.get_num_threads()
        other_started.wait(10)  # a drawing starts beside the pass
        control.at_pause()
        teams["pause beside other work"] = torch.get_num_threads()
        other_release.set()
        while share.running > 1:  # the drawing ends
            threading.Event().wait(0.005)
        control.at_boundary()
        teams["boundary alone"] = torch.get_num_threads()
        return list(items)

    async def scenario() -> None:
        with CountedThreads(share, max_workers=3) as threads:
            batcher = Batcher("m", SlotLimiter(1, 10), 8, 0.0, threads, fit=fit_of(threads))
            passing = asyncio.ensure_future(batcher.submit("k", "a", 1, run, chunked=True))

            def draw() -> None:
                other_started.set()
                other_release.wait(10)

            await asyncio.sleep(0.05)
            drawing = asyncio.get_running_loop().run_in_executor(threads, draw)
            assert (await asyncio.wait_for(passing, 10))[0] == "a"
            await drawing
            await batcher.close()

    asyncio.run(scenario())
    assert teams == {"start": 2, "pause beside other work": 1, "boundary alone": 2}


def test_a_share_that_does_not_fit_teams_gives_the_passes_no_fit() -> None:
    """``CAMSERVE_FIT_PASS_THREADS=false``: the work is still counted, the passes keep torch's
    threads."""
    share = CpuShare(cores=2, fit_teams=False)
    with CountedThreads(share, max_workers=1) as counted:
        assert fit_of(counted) is None
        assert counted.submit(lambda: share.running).result(10) == 1


def test_a_job_takes_every_core_back_after_the_guests_it_ran() -> None:
    """A background chunked pass keeps every core beside other work; an interactive guest that
    it runs at a pause narrows the thread for itself, and the job widens it again at its next
    pause."""
    share = CpuShare(cores=2, clock=lambda: 0.0)  # the drawing never lasts for the job
    teams: list[tuple[str, int]] = []
    other_release = threading.Event()

    def job(items: Sequence[str], control: PassControl) -> list[str]:
        teams.append(("job start", torch.get_num_threads()))
        while not guest_offered.is_set():
            control.at_pause()
            threading.Event().wait(0.005)
        control.at_pause()  # the guest runs here, then the job goes on
        teams.append(("job after the guest", torch.get_num_threads()))
        return list(items)

    def guest(items: Sequence[str], control: PassControl) -> list[str]:
        teams.append(("guest", torch.get_num_threads()))
        return list(items)

    guest_offered = threading.Event()

    async def scenario() -> None:
        with CountedThreads(share, max_workers=3) as threads:
            batcher = Batcher("m", SlotLimiter(1, 10), 8, 0.0, threads, fit=fit_of(threads))
            drawing = asyncio.get_running_loop().run_in_executor(
                threads, lambda: other_release.wait(10)
            )
            hosting = asyncio.ensure_future(
                batcher.submit("j", "a", 1, job, priority="background", chunked=True)
            )
            await asyncio.sleep(0.05)
            asking = asyncio.ensure_future(batcher.submit("g", "b", 1, guest))
            await asyncio.sleep(0.05)
            guest_offered.set()
            assert (await asyncio.wait_for(asking, 10))[0] == "b"
            assert (await asyncio.wait_for(hosting, 10))[0] == "a"
            other_release.set()
            await drawing
            await batcher.close()

    asyncio.run(scenario())
    assert teams == [("job start", 2), ("guest", 1), ("job after the guest", 2)]
