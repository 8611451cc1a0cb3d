"""The background job store, without HTTP: create, progress, finish, cancel, expire, limit, cut.

The explainer is a stand-in the test drives: it holds each job until released and reports the
progress the test gives it, so every state change happens at a known point."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import pytest

from app.cam import ProgressCallback
from app.errors import InvalidParameter, JobNotFound, OverBudget, TooManyJobs
from app.lifecycle import Lifecycle
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.jobs import Job, JobStore
from app.pipeline.results import ExplainResponse

EXAMPLE: dict[str, Any] = ExplainResponse.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]


class FakeLimiter:
    def retry_after(self) -> int:
        return 7


class FakeExplainer:
    """Refuses method "bad" at the check; each explain waits for ``release`` after reporting
    ``steps``, then answers, or raises ``fail`` when set."""

    def __init__(self, steps: Sequence[tuple[int, int]] = ((0, 0), (1, 4))) -> None:
        self.limiter = FakeLimiter()
        self.steps = steps
        self.release = asyncio.Event()
        self.reported = asyncio.Event()
        self.fail: Exception | None = None
        self.calls: list[tuple[str | None, int, ExplainParams, bool]] = []
        self.interrupted = False

    def check(self, model: str | None, params: ExplainParams, images: int) -> None:
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
    ) -> ExplainResponse:
        self.calls.append((model, len(uploads), params, admit))
        assert progress is not None
        for done, total in self.steps:
            # As the pass thread does: from another thread, through call_soon_threadsafe.
            await asyncio.to_thread(progress, done, total)
        await asyncio.sleep(0)  # let the reports scheduled on the loop run
        self.reported.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.interrupted = True
            raise
        if self.fail is not None:
            raise self.fail
        return ExplainResponse.model_validate(EXAMPLE)


UPLOADS = [Upload(filename="a.png", data=b"png bytes")]


def scenario(
    test: Callable[[JobStore, FakeExplainer, Lifecycle], Awaitable[None]],
    *,
    max_jobs: int = 4,
    ttl_s: float = 60.0,
) -> None:
    async def run() -> None:
        explainer = FakeExplainer()
        lifecycle = Lifecycle(grace_s=0.0)
        store = JobStore(cast(Explainer, explainer), max_jobs, ttl_s, lifecycle)
        try:
            await test(store, explainer, lifecycle)
        finally:
            explainer.release.set()
            await store.close()

    asyncio.run(run())


async def _finished(job: Job) -> None:
    while not job.is_finished:
        assert await job.changed(10), job.view()


def test_a_job_is_created_queued_and_runs_without_admission() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        params = ExplainParams(method="GradCAM")
        job = store.create("tiny", UPLOADS, params)
        assert job.status == "queued" and job.url == f"/jobs/{job.id}"
        assert len(job.id) >= 22 and store.get(job.id) is job
        await explainer.reported.wait()
        assert explainer.calls == [("tiny", 1, params, False)]
        assert store.counts() == {
            "queued": 0,
            "running": 1,
            "succeeded": 0,
            "failed": 0,
            "cancelled": 0,
        }

    scenario(test)


def test_bad_parameters_are_refused_at_creation_and_store_nothing() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        with pytest.raises(InvalidParameter):
            store.create(None, UPLOADS, ExplainParams(method="bad"))
        assert sum(store.counts().values()) == 0 and explainer.calls == []

    scenario(test)


def test_progress_runs_then_succeeds_with_the_result() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        job = store.create(None, UPLOADS, ExplainParams())
        await explainer.reported.wait()
        view = job.view()
        assert view.status == "running" and view.started is not None
        assert (view.progress.done, view.progress.total) == (1, 4)
        assert view.progress.eta_s is not None and view.progress.eta_s >= 0
        explainer.release.set()
        await _finished(job)
        view = job.view()
        assert view.status == "succeeded" and view.error is None
        assert view.result == ExplainResponse.model_validate(EXAMPLE)
        assert (view.progress.done, view.progress.total, view.progress.eta_s) == (4, 4, None)
        assert job.view(with_result=False).result is None

    scenario(test)


@pytest.mark.parametrize(
    ("error", "code"),
    [(OverBudget("too many forwards"), "over_budget"), (RuntimeError("bug"), "internal_error")],
)
def test_a_failing_explanation_fails_the_job_with_its_error(error: Exception, code: str) -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        explainer.fail = error
        explainer.release.set()
        job = store.create(None, UPLOADS, ExplainParams())
        await _finished(job)
        assert job.status == "failed" and job.result is None
        assert job.error is not None and job.error.code == code
        if code == "internal_error":
            assert "bug" not in job.error.message  # the details stay in the log

    scenario(test)


def test_cancel_stops_a_running_job_and_forgets_a_finished_one() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        job = store.create(None, UPLOADS, ExplainParams())
        await explainer.reported.wait()
        assert store.cancel(job.id) is job
        assert job.status == "cancelled" and job.error is not None
        assert job.error.code == "cancelled"
        assert job.task is not None
        await asyncio.gather(job.task, return_exceptions=True)
        assert explainer.interrupted and job.result is None
        assert store.get(job.id) is job  # kept for its TTL
        store.cancel(job.id)  # finished: forgotten
        with pytest.raises(JobNotFound):
            store.get(job.id)

    scenario(test)


def test_finished_jobs_are_forgotten_after_the_ttl() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        explainer.release.set()
        job = store.create(None, UPLOADS, ExplainParams())
        await _finished(job)
        with pytest.raises(JobNotFound) as error:
            store.get(job.id)  # a TTL of 0: forgotten at the next look
        assert "CAMSERVE_JOB_TTL_S" in error.value.message

    scenario(test, ttl_s=0.0)


def test_unfinished_jobs_never_expire() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        job = store.create(None, UPLOADS, ExplainParams())
        await explainer.reported.wait()
        assert store.get(job.id) is job and store.unfinished == 1

    scenario(test, ttl_s=0.0)


def test_the_store_keeps_at_most_max_jobs() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, _: Lifecycle) -> None:
        first = store.create(None, UPLOADS, ExplainParams())
        with pytest.raises(TooManyJobs) as error:
            store.create(None, UPLOADS, ExplainParams())
        # Nothing finished yet: the retry hint is the model slots'.
        assert error.value.headers == {"Retry-After": "7"}
        explainer.release.set()
        await _finished(first)
        with pytest.raises(TooManyJobs) as error:
            store.create(None, UPLOADS, ExplainParams())
        # A finished job frees its place when its TTL (60 s) is up.
        assert 59 <= int(error.value.headers["Retry-After"]) <= 60
        store.cancel(first.id)  # forgetting it makes room
        store.create(None, UPLOADS, ExplainParams())

    scenario(test, max_jobs=1)


def test_the_shutdown_cut_cancels_unfinished_jobs() -> None:
    async def test(store: JobStore, explainer: FakeExplainer, lifecycle: Lifecycle) -> None:
        job = store.create(None, UPLOADS, ExplainParams())
        await explainer.reported.wait()
        assert lifecycle.in_flight == 1  # the drain waits for jobs too
        lifecycle.begin_drain()
        assert lifecycle.ready_to_exit() is False  # grace 0: cut now
        assert job.status == "cancelled" and job.error is not None
        assert job.error.code == "shutting_down"
        assert job.task is not None
        await asyncio.gather(job.task, return_exceptions=True)
        assert explainer.interrupted and lifecycle.in_flight == 0

    scenario(test)
