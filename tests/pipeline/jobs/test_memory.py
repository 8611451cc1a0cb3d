"""The in-process job store without HTTP: create, progress, finish, fail, cancel, expire, admit,
budget the uploads, stream the events, cut at shutdown.

The explainer is a stand-in the test drives: each explanation waits for the test's next step (a
progress report, a result, an error), and the store's monotonic clock is one the test moves. So
every state change and every ETA happens at a known point; nothing waits on wall-clock time
(``WAIT_S`` only bounds a step that never comes, so that a broken store fails instead of hanging).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from app.cam import ProgressCallback
from app.errors import (
    CamserveError,
    InvalidParameter,
    JobNotFound,
    OverBudget,
    PayloadTooLarge,
    TooManyJobs,
)
from app.lifecycle import Lifecycle
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.jobs import memory, record
from app.pipeline.jobs.base import JobEvent
from app.pipeline.jobs.memory import MemoryJobStore
from app.pipeline.results import ExplainResponse, JobProgress, JobStatus, JobView

_EXAMPLES: Any = ExplainResponse.model_config["json_schema_extra"]
RESULT = ExplainResponse.model_validate(_EXAMPLES["examples"][0])
RETRY_S = 7
"""What the fake model slots say to retry after when no job has an ETA."""
WAIT_S = 10.0
PARAMS = ExplainParams(method="GradCAM")


def uploads(*sizes: int) -> list[Upload]:
    return [Upload(f"{i}.png", bytes(size)) for i, size in enumerate(sizes or (10,))]


class Clock:
    """Stands in for ``time`` in the store's modules: progress pace, ETAs and TTLs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Run:
    """One call of ``explain``: what it was given, and the steps the test feeds it."""

    model: str | None
    images: int
    params: ExplainParams
    admit: bool
    version: int | None
    progress: ProgressCallback
    steps: asyncio.Queue[tuple[object, asyncio.Future[None]]] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def _step(self, step: object) -> asyncio.Future[None]:
        heard = asyncio.get_running_loop().create_future()
        self.steps.put_nowait((step, heard))
        return heard

    async def report(self, done: int, total: int) -> None:
        """Report progress as the pass thread does; returns once the job has heard it."""
        await asyncio.wait_for(self._step((done, total)), WAIT_S)

    def succeed(self) -> None:
        self._step(RESULT)

    def fail(self, error: Exception) -> None:
        self._step(error)

    async def was_cancelled(self) -> None:
        await asyncio.wait_for(self.cancelled.wait(), WAIT_S)


class FakeLimiter:
    def __init__(self, max_running: int) -> None:
        self.max_running = max_running

    def retry_after(self) -> int:
        return RETRY_S


class FakeExplainer:
    """Refuses method "bad" at the check; each explanation is a ``Run`` the test drives."""

    def __init__(self, max_running: int) -> None:
        self.limiter = FakeLimiter(max_running)
        self.checked: list[tuple[str | None, int, ExplainParams, int | None]] = []
        self.runs: asyncio.Queue[Run] = asyncio.Queue()
        self.scopes: list[str | None] = []

    async def check_uploads(
        self,
        model: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        version: int | None = None,
        *,
        job: bool = False,
    ) -> None:
        assert job  # a job is checked as one: what only jobs may ask for (ROAD) is allowed
        self.checked.append((model, len(uploads), params, version))
        if params.method == "bad":
            raise InvalidParameter("Unknown method 'bad'.")

    async def explain(
        self,
        model: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        *,
        progress: ProgressCallback | None = None,
        admit: bool = True,
        version: int | None = None,
        priority: str = "interactive",
        job: bool = False,
        scope: str | None = None,
    ) -> ExplainResponse:
        assert progress is not None
        self.scopes.append(scope)
        assert priority == "background"  # a job never goes before interactive requests
        assert job  # and runs as one
        run = Run(model, len(uploads), params, admit, version, progress)
        self.runs.put_nowait(run)
        try:
            while True:
                step, heard = await run.steps.get()
                if isinstance(step, tuple):
                    # From another thread, as the pass does. The store hands the report to the
                    # loop first, so the job has it before this task resumes.
                    await asyncio.to_thread(progress, *step)
                    heard.set_result(None)
                elif isinstance(step, Exception):
                    raise step
                else:
                    return cast(ExplainResponse, step)
        except asyncio.CancelledError:
            run.cancelled.set()
            raise


@dataclass
class World:
    store: MemoryJobStore
    explainer: FakeExplainer
    lifecycle: Lifecycle
    clock: Clock

    async def submit(
        self,
        model: str | None = None,
        files: Sequence[Upload] | None = None,
        client: str = "",
        params: ExplainParams = PARAMS,
    ) -> JobView:
        return await self.store.create(model, files or uploads(), params, client=client)

    async def next_run(self) -> Run:
        """The next explanation the store starts."""
        return await asyncio.wait_for(self.explainer.runs.get(), WAIT_S)

    def follow(
        self, job_id: str, last_event_id: str | None = None, keep_alive_s: float = WAIT_S
    ) -> aclosing[AsyncGenerator[JobEvent | None, None]]:
        """The job's events, closed when the block ends (the memory store's is a generator)."""
        events = self.store.events(job_id, last_event_id, keep_alive_s)
        return aclosing(cast(AsyncGenerator[JobEvent | None, None], events))

    async def settled(self, job_id: str) -> JobView:
        """The job once finished, as its final event tells it."""
        async with self.follow(job_id) as events:
            async for event in events:
                assert event is not None, "the job did not finish"
                if event.name != "progress":
                    return JobView.model_validate_json(event.data)
        raise AssertionError("the events ended without a final one")

    async def status(self, job_id: str) -> JobStatus:
        return (await self.store.get(job_id)).status


def play(
    monkeypatch: pytest.MonkeyPatch,
    body: Callable[[World], Awaitable[None]],
    *,
    max_jobs: int = 4,
    ttl_s: float = 60.0,
    max_running: int = 1,
    max_per_client: int | None = None,
    max_upload_bytes: int | None = None,
) -> None:
    clock = Clock()
    monkeypatch.setattr(record, "time", clock)
    monkeypatch.setattr(memory, "time", clock)

    async def main() -> None:
        explainer = FakeExplainer(max_running)
        lifecycle = Lifecycle(grace_s=0.0)
        store = MemoryJobStore(
            cast(Explainer, explainer),
            max_jobs,
            ttl_s,
            lifecycle,
            max_per_client=max_per_client,
            max_upload_bytes=max_upload_bytes,
        )
        try:
            await asyncio.wait_for(body(World(store, explainer, lifecycle, clock)), 3 * WAIT_S)
        finally:
            await store.close()

    asyncio.run(main())


def counts(**nonzero: int) -> dict[str, int]:
    return {
        **dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0),
        **nonzero,
    }


def progress(view: JobView) -> tuple[JobStatus, int, int, float | None]:
    return view.status, view.progress.done, view.progress.total, view.progress.eta_s


def test_a_job_is_created_queued_and_runs_without_admission(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(w: World) -> None:
        view = await w.store.create(
            "tiny", uploads(3, 4), PARAMS, model_version=3, client="key:c", scope="key:c"
        )
        assert view.status == "queued" and view.url == f"/jobs/{view.id}"
        assert len(view.id) >= 24  # 18 random bytes in URL-safe base64
        assert view.started is None and view.finished is None and view.result is None
        assert view.progress == JobProgress(done=0, total=0, eta_s=None)
        assert w.explainer.checked == [("tiny", 2, PARAMS, 3)]
        run = await w.next_run()
        # The job waits for its slot instead of being refused: no admission, same version.
        assert (run.model, run.images, run.params, run.admit, run.version) == (
            "tiny",
            2,
            PARAMS,
            False,
            3,
        )
        assert w.explainer.scopes == ["key:c"]  # its key's cached explanations, as /explain's
        assert await w.store.get(view.id) == view  # queued until the pass reports
        await run.report(0, 0)
        running = await w.store.get(view.id)
        assert running.status == "running" and running.started is not None
        assert w.store.counts() == counts(running=1)
        assert (await w.submit()).id != view.id

    play(monkeypatch, body)


def test_bad_parameters_are_refused_at_creation_and_store_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(w: World) -> None:
        with pytest.raises(InvalidParameter):
            await w.submit(params=ExplainParams(method="bad"))
        assert w.store.counts() == counts()
        assert w.explainer.runs.empty()
        await w.submit()  # the refused job took no place (max_jobs=1)
        assert w.store.counts() == counts(queued=1)

    play(monkeypatch, body, max_jobs=1)


def test_progress_runs_then_succeeds_with_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        job = await w.submit()
        run = await w.next_run()
        seen = []
        await run.report(0, 0)  # the pass starts
        seen.append(progress(await w.store.get(job.id)))
        await run.report(0, 4)  # it knows how many forwards
        seen.append(progress(await w.store.get(job.id)))
        for done in (1, 2, 3):
            w.clock.advance(10.0)
            await run.report(done, 4)
            seen.append(progress(await w.store.get(job.id)))
        # 10 s a forward: the ETA counts down as the forwards go.
        assert seen == [
            ("running", 0, 0, None),
            ("running", 0, 4, None),
            ("running", 1, 4, 30.0),
            ("running", 2, 4, 20.0),
            ("running", 3, 4, 10.0),
        ]
        run.succeed()
        final = await w.settled(job.id)
        assert progress(final) == ("succeeded", 4, 4, None)
        assert final.result == RESULT and final.error is None
        assert final.started is not None and final.finished is not None
        assert final.started <= final.finished
        assert await w.store.get(job.id) == final
        assert w.store.counts() == counts(succeeded=1)

    play(monkeypatch, body)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OverBudget("Too many forwards.", details={"forwards": 9}), "over_budget"),
        (RuntimeError("secret bug"), "internal_error"),
    ],
)
def test_a_failing_explanation_fails_the_job_with_its_code(
    monkeypatch: pytest.MonkeyPatch, error: Exception, code: str
) -> None:
    async def body(w: World) -> None:
        job = await w.submit()
        run = await w.next_run()
        await run.report(1, 4)
        run.fail(error)
        final = await w.settled(job.id)
        assert final.status == "failed" and final.result is None
        assert final.error is not None and final.error.code == code
        if isinstance(error, CamserveError):
            assert final.error.message == error.message
            assert final.error.details == error.details
        else:
            assert "secret bug" not in final.error.message  # the details stay in the log
        assert w.store.counts() == counts(failed=1)

    play(monkeypatch, body)


def test_cancel_stops_a_running_job_and_forgets_a_finished_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(w: World) -> None:
        job = await w.submit()
        run = await w.next_run()
        await run.report(1, 4)
        cancelled = await w.store.cancel(job.id)
        assert cancelled.status == "cancelled" and cancelled.finished is not None
        assert cancelled.error is not None and cancelled.error.code == "cancelled"
        await run.was_cancelled()  # the pass stops
        kept = await w.store.get(job.id)  # kept for its TTL, without a result
        assert kept.status == "cancelled" and kept.result is None
        assert (await w.store.cancel(job.id)).status == "cancelled"  # finished: forgotten
        with pytest.raises(JobNotFound):
            await w.store.get(job.id)
        with pytest.raises(JobNotFound):
            await w.store.cancel(job.id)
        assert w.store.counts() == counts()

    play(monkeypatch, body)


def test_a_job_cancelled_while_queued_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        first = await w.submit("first")
        run = await w.next_run()
        queued = await w.submit("queued")  # one model slot: it waits for its turn
        assert (await w.store.cancel(queued.id)).status == "cancelled"
        run.succeed()
        assert (await w.settled(first.id)).status == "succeeded"
        await w.submit("last")
        assert (await w.next_run()).model == "last"  # the cancelled one was skipped

    play(monkeypatch, body, max_running=1)


def test_finished_jobs_are_forgotten_after_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        job = await w.submit()
        (await w.next_run()).succeed()
        await w.settled(job.id)
        w.clock.advance(59.9)
        assert await w.status(job.id) == "succeeded"
        w.clock.advance(0.1)
        with pytest.raises(JobNotFound) as error:
            await w.store.get(job.id)
        assert "CAMSERVE_JOB_TTL_S" in error.value.message
        assert w.store.counts() == counts()

    play(monkeypatch, body, ttl_s=60.0)


def test_unfinished_jobs_never_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        running = await w.submit()
        await (await w.next_run()).report(1, 4)
        queued = await w.submit()
        w.clock.advance(1e9)
        assert await w.status(running.id) == "running"
        assert await w.status(queued.id) == "queued"
        assert w.store.counts() == counts(queued=1, running=1)

    play(monkeypatch, body, ttl_s=0.0, max_running=1)


def test_max_jobs_counts_unfinished_jobs_and_finished_ones_make_room_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(w: World) -> None:
        a, b = await w.submit("a"), await w.submit("b")
        with pytest.raises(TooManyJobs) as error:
            await w.submit("c")
        assert error.value.status_code == 503 and "CAMSERVE_MAX_JOBS" in error.value.message
        assert error.value.headers == {"Retry-After": str(RETRY_S)}  # no ETA known yet
        run_a, run_b = await w.next_run(), await w.next_run()
        assert (run_a.model, run_b.model) == ("a", "b")
        run_a.succeed()
        await w.settled(a.id)
        w.clock.advance(1.0)
        run_b.succeed()
        await w.settled(b.id)
        await w.submit("c")  # finished jobs do not count; the oldest makes room
        with pytest.raises(JobNotFound):
            await w.store.get(a.id)
        assert await w.status(b.id) == "succeeded"
        await w.submit("d")
        with pytest.raises(JobNotFound):
            await w.store.get(b.id)
        assert w.store.counts() == counts(queued=2)
        with pytest.raises(TooManyJobs):
            await w.submit("e")

    play(monkeypatch, body, max_jobs=2, max_running=2)


def test_one_client_may_keep_only_max_per_client_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        mine = await w.submit(client="x")
        with pytest.raises(TooManyJobs) as error:
            await w.submit(client="x")
        assert "CAMSERVE_MAX_JOBS_PER_CLIENT" in error.value.message
        await w.submit(client="y")  # others still may
        (await w.next_run()).succeed()
        await w.settled(mine.id)
        await w.submit(client="x")  # a finished job no longer counts
        assert w.store.counts() == counts(queued=2, succeeded=1)

    play(monkeypatch, body, max_jobs=4, max_per_client=1)


def test_jobs_sent_at_once_cannot_pass_the_limits_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The uploads' check awaits (a header read, a decode estimate): jobs created at once all
    passed the count before any of them took its place, and 100 at once kept 75 (a hostile
    review). The count is checked again with no await before the place is taken."""

    async def body(w: World) -> None:
        checking = w.explainer.check_uploads

        async def slow(*args: object, **kwargs: object) -> None:
            await asyncio.sleep(0.01)  # every request passes the first count meanwhile
            await checking(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(w.explainer, "check_uploads", slow)
        sent = await asyncio.gather(
            *(w.submit(client="x") for _ in range(10)), return_exceptions=True
        )
        kept = [one for one in sent if not isinstance(one, BaseException)]
        refused = [one for one in sent if isinstance(one, TooManyJobs)]
        assert len(kept) == 2 and len(refused) == 8
        assert w.store.counts() == counts(queued=2)
        others = await asyncio.gather(
            *(w.submit(client=f"c{i}") for i in range(6)), return_exceptions=True
        )
        assert sum(not isinstance(one, BaseException) for one in others) == 2  # max_jobs 4
        assert w.store.counts() == counts(queued=4)

    play(monkeypatch, body, max_jobs=4, max_per_client=2)


def test_retry_after_comes_from_the_blocking_jobs_etas(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        await w.submit(client="x")
        await w.submit(client="y")
        run_x, run_y = await w.next_run(), await w.next_run()
        await run_x.report(0, 4)
        await run_y.report(0, 8)
        w.clock.advance(10.0)
        await run_x.report(1, 4)
        await run_y.report(5, 8)
        w.clock.advance(2.5)  # ETAs now: x 12.5 s a forward * 3 = 37.5 s; y 2.5 s * 3 = 7.5 s
        with pytest.raises(TooManyJobs) as error:
            await w.submit(client="x")
        # Refused for its own job: the hint is when that one should end.
        assert error.value.headers == {"Retry-After": "38"}
        await w.submit(client="z")  # queued: no ETA
        with pytest.raises(TooManyJobs) as error:
            await w.submit(client="w")
        # The store is full: the hint is when the first of all should end.
        assert error.value.headers == {"Retry-After": "8"}

    play(monkeypatch, body, max_jobs=3, max_per_client=1, max_running=2)


def test_the_upload_bytes_kept_by_unfinished_jobs_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(w: World) -> None:
        with pytest.raises(PayloadTooLarge) as too_large:
            await w.submit(files=uploads(20, 6))
        assert too_large.value.status_code == 413
        assert "CAMSERVE_JOB_UPLOAD_BUDGET_BYTES" in too_large.value.message
        assert w.store.counts() == counts() and w.explainer.checked == []
        first = await w.submit(files=uploads(12, 8))  # 20 bytes kept
        with pytest.raises(TooManyJobs) as full:
            await w.submit(files=uploads(6))
        assert full.value.status_code == 503 and "20 bytes" in full.value.message
        assert full.value.headers == {"Retry-After": str(RETRY_S)}
        await w.submit(files=uploads(5))  # exactly the budget
        (await w.next_run()).succeed()
        await w.settled(first.id)
        await w.submit(files=uploads(20))  # a finished job keeps no upload
        assert w.store.counts() == counts(queued=2, succeeded=1)

    play(monkeypatch, body, max_jobs=8, max_running=1, max_upload_bytes=25)


def _state(event: JobEvent | None) -> tuple[str, dict[str, Any]]:
    assert event is not None
    return event.name, json.loads(event.data)


def test_events_follow_the_progress_then_end_with_the_final_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body(w: World) -> None:
        job = await w.submit()
        run = await w.next_run()
        async with w.follow(job.id) as events:
            queued = await anext(events)
            assert _state(queued) == (
                "progress",
                {"status": "queued", "progress": {"done": 0, "total": 0, "eta_s": None}},
            )
            await run.report(0, 4)
            started = await anext(events)
            assert _state(started) == (
                "progress",
                {"status": "running", "progress": {"done": 0, "total": 4, "eta_s": None}},
            )
            w.clock.advance(10.0)
            await run.report(1, 4)
            first = await anext(events)
            assert _state(first) == (
                "progress",
                {"status": "running", "progress": {"done": 1, "total": 4, "eta_s": 30.0}},
            )
            assert queued and started and first
            assert int(queued.id) < int(started.id) < int(first.id)
            run.succeed()
            final = await anext(events)
            assert final is not None and final.name == "succeeded"
            assert int(final.id) > int(first.id)
            assert JobView.model_validate_json(final.data).result == RESULT
            with pytest.raises(StopAsyncIteration):
                await anext(events)
        # A finished job: the final event only, even from the start.
        async with w.follow(job.id) as events:
            assert [event async for event in events] == [final]

    play(monkeypatch, body)


def test_events_resume_after_the_last_event_id(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        job = await w.submit()
        run = await w.next_run()
        await run.report(0, 4)
        async with w.follow(job.id) as events:
            seen = await anext(events)
        assert seen is not None
        await run.report(1, 4)
        async with w.follow(job.id, seen.id) as events:
            missed = await anext(events)  # what happened while away, and nothing before
            assert _state(missed)[1]["progress"]["done"] == 1
            assert missed and int(missed.id) > int(seen.id)
        # Resumed at the newest: nothing new, so a keep-alive (a short one, not to wait).
        async with w.follow(job.id, missed.id, 0.01) as events:
            assert await anext(events) is None
        run.succeed()
        async with w.follow(job.id, missed.id) as events:
            assert [event.name async for event in events if event] == ["succeeded"]

    play(monkeypatch, body)


def test_the_shutdown_cut_cancels_unfinished_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(w: World) -> None:
        running = await w.submit("running")
        run = await w.next_run()
        await run.report(1, 4)
        queued = await w.submit("queued")
        await asyncio.sleep(0)  # its task starts (and waits for the slot)
        assert w.lifecycle.in_flight == 2  # the drain waits for jobs, queued ones too
        w.lifecycle.begin_drain()
        assert w.lifecycle.ready_to_exit() is False  # grace 0: cut now, exit after the margin
        for job in (running, queued):
            view = await w.store.get(job.id)
            assert view.status == "cancelled"
            assert view.error is not None and view.error.code == "shutting_down"
        await run.was_cancelled()
        await w.store.close()
        assert w.lifecycle.in_flight == 0
        assert w.explainer.runs.empty()  # the queued one never started

    play(monkeypatch, body, max_running=1)
