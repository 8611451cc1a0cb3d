"""Explanations run as jobs: created at once, followed by id, cancelled on request, kept a while.

A job runs ``Explainer.explain`` as an asyncio task without admission (jobs are bounded by their
own count, ``CAMSERVE_MAX_JOBS``, and wait for a model slot instead of being refused), in the
background priority class: interactive requests on its model go first, at its chunk boundaries
(``app.pipeline.scheduling``). The pass
thread reports progress through ``call_soon_threadsafe``; every change wakes the job's followers
(``GET /jobs/{id}/events``). Cancelling the task stops the pass at its next chunk.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import get_args

from app.errors import CamserveError, JobNotFound, ShuttingDown, TooManyJobs, clip, error_body
from app.lifecycle import Lifecycle
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.results import ErrorDetail, ExplainResponse, JobProgress, JobStatus, JobView

logger = logging.getLogger(__name__)

FINISHED: frozenset[JobStatus] = frozenset({"succeeded", "failed", "cancelled"})


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(eq=False)
class Job:
    """One explanation run in the background, and everything a client may ask about it."""

    id: str
    created: datetime = field(default_factory=_now)
    status: JobStatus = "queued"
    started: datetime | None = None
    finished: datetime | None = None
    done: int = 0
    total: int = 0
    result: ExplainResponse | None = None
    error: ErrorDetail | None = None
    expires: float = math.inf
    """Monotonic time after which a finished job is forgotten."""
    task: asyncio.Task[None] | None = None
    _progress_since: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"/jobs/{self.id}"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def _touch(self) -> None:
        """Wake everyone waiting for a change, and arm a fresh event for the next one."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> bool:
        """Wait for the next change; False after ``timeout`` seconds without one."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def on_progress(self, done: int, total: int) -> None:
        """A report from the pass: (0, 0) when the pass starts, then after each chunk."""
        if self.is_finished:
            return
        if self.status == "queued":
            self.status = "running"
            self.started = _now()
        if total > 0:
            if self._progress_since is None:
                self._progress_since = time.monotonic()
            self.done, self.total = done, total
        self._touch()

    def finish(
        self,
        status: JobStatus,
        ttl_s: float,
        result: ExplainResponse | None = None,
        error: ErrorDetail | None = None,
    ) -> None:
        if self.is_finished:
            return
        self.status = status
        self.finished = _now()
        self.result = result
        self.error = error
        if status == "succeeded":
            self.done = self.total
        self.expires = time.monotonic() + ttl_s
        self._touch()

    def eta_s(self) -> float | None:
        if self.is_finished or self._progress_since is None or not 0 < self.done < self.total:
            return None
        elapsed = time.monotonic() - self._progress_since
        return round(elapsed / self.done * (self.total - self.done), 3)

    def view(self, with_result: bool = True) -> JobView:
        return JobView(
            id=self.id,
            status=self.status,
            url=self.url,
            created=self.created,
            started=self.started,
            finished=self.finished,
            progress=JobProgress(done=self.done, total=self.total, eta_s=self.eta_s()),
            result=self.result if with_result else None,
            error=self.error,
        )


class JobStore:
    """At most ``max_jobs`` jobs (queued, running or finished and kept for ``ttl_s``)."""

    def __init__(
        self, explainer: Explainer, max_jobs: int, ttl_s: float, lifecycle: Lifecycle
    ) -> None:
        self.explainer = explainer
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.lifecycle = lifecycle
        self._jobs: dict[str, Job] = {}
        lifecycle.on_cut(self._cut)

    @property
    def unfinished(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.is_finished)

    def counts(self) -> dict[JobStatus, int]:
        """How many jobs are kept, by status (every status listed, zeros included)."""
        counts: dict[JobStatus, int] = dict.fromkeys(get_args(JobStatus), 0)
        for job in self._jobs.values():
            counts[job.status] += 1
        return counts

    def purge(self) -> None:
        """Forget finished jobs whose time is up."""
        now = time.monotonic()
        for job_id in [i for i, job in self._jobs.items() if job.expires <= now]:
            del self._jobs[job_id]

    def create(self, model: str | None, uploads: Sequence[Upload], params: ExplainParams) -> Job:
        """Check the parameters, then start the job; TooManyJobs when the store is full."""
        self.purge()
        if len(self._jobs) >= self.max_jobs:
            raise TooManyJobs(
                f"{len(self._jobs)} jobs exist, the most kept at once (CAMSERVE_MAX_JOBS); "
                "retry later, or DELETE finished jobs you no longer need.",
                headers={"Retry-After": str(self._retry_after())},
            )
        self.explainer.check(model, params, len(uploads))
        job = Job(id=secrets.token_urlsafe(18))
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(
            self._run(job, model, list(uploads), params), name=f"job-{job.id[:8]}"
        )
        logger.info("job %s created (%d image(s))", job.id[:8], len(uploads))
        return job

    def get(self, job_id: str) -> Job:
        self.purge()
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(
                f"No job {clip(job_id)}: it never existed, or it finished more than "
                f"{self.ttl_s:g} s ago (CAMSERVE_JOB_TTL_S) or was deleted. Submit it again."
            )
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (its work stops at the next chunk); forget a
        finished one."""
        job = self.get(job_id)
        if job.is_finished:
            del self._jobs[job.id]
            return job
        self._stop(job, "cancelled", "Cancelled by DELETE /jobs/{id}.")
        return job

    def _stop(self, job: Job, code: str, message: str) -> None:
        job.finish("cancelled", self.ttl_s, error=ErrorDetail(code=code, message=message))
        if job.task is not None:
            job.task.cancel()

    def _cut(self) -> None:
        for job in self._jobs.values():
            if not job.is_finished:
                self._stop(job, ShuttingDown.code, "The service shut down before the job ended.")

    async def close(self) -> None:
        """At shutdown: cancel what is left and wait for the tasks to end."""
        self._cut()
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _retry_after(self) -> int:
        now = time.monotonic()
        ends = [job.expires - now for job in self._jobs.values() if job.is_finished]
        return (
            max(1, math.ceil(min(ends))) if ends else max(1, self.explainer.limiter.retry_after())
        )

    async def _run(
        self, job: Job, model: str | None, uploads: list[Upload], params: ExplainParams
    ) -> None:
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:  # called in the pass thread
            loop.call_soon_threadsafe(job.on_progress, done, total)

        with self.lifecycle.track():
            try:
                result = await self.explainer.explain(
                    model, uploads, params, progress=report, admit=False, priority="background"
                )
            except asyncio.CancelledError:
                # Cancelled by DELETE or the shutdown, which set the status.
                logger.info(
                    "job %s cancelled (%s)", job.id[:8], job.error.code if job.error else ""
                )
                return
            except CamserveError as error:
                detail = error_body(error.code, error.message, error.details)["error"]
                job.finish("failed", self.ttl_s, error=ErrorDetail(**detail))
            except Exception:
                logger.exception("job %s failed", job.id[:8])
                job.finish(
                    "failed",
                    self.ttl_s,
                    error=ErrorDetail(
                        code="internal_error",
                        message="Internal server error; the details are in the log.",
                    ),
                )
            else:
                job.finish("succeeded", self.ttl_s, result=result)
            finally:
                del uploads[:]  # the upload bytes are not kept with the result
        logger.info("job %s %s", job.id[:8], job.status)
