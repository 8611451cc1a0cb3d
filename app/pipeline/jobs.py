"""Explanations run as jobs: created at once, followed by id, cancelled on request, kept a while.

A job runs ``Explainer.explain`` as an asyncio task without admission (jobs are bounded by their
own count, ``CAMSERVE_MAX_JOBS``, and wait for a model slot instead of being refused). Only as
many jobs as there are model slots go past their turn at once: a queued job holds its upload
bytes only, and decodes them once its turn comes. The pass thread reports progress through
``call_soon_threadsafe``; every change wakes the job's followers (``GET /jobs/{id}/events``).
Cancelling the task stops the pass at its next chunk.

Admission counts queued and running jobs only: finished ones are kept for ``ttl_s`` while there
is room, the oldest forgotten first when a new job needs its place. One client (an API key, or
an address when no key is sent) may have at most ``max_per_client`` jobs unfinished.
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
from typing import NoReturn, get_args

from app.errors import (
    CamserveError,
    JobCancelled,
    JobNotFound,
    PayloadTooLarge,
    ShuttingDown,
    TooManyJobs,
    clip,
    error_body,
)
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
    client: str = ""
    """Who submitted it (the per-client cap counts by this)."""
    upload_bytes: int = 0
    """Bytes of its uploads, kept until it ends."""
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


_REFUSAL_LOG_EVERY_S = 10.0


class JobStore:
    """At most ``max_jobs`` jobs kept: queued or running ones (``max_per_client`` of them per
    client), and finished ones for ``ttl_s`` while they leave room."""

    def __init__(
        self,
        explainer: Explainer,
        max_jobs: int,
        ttl_s: float,
        lifecycle: Lifecycle,
        max_per_client: int | None = None,
        max_upload_bytes: int | None = None,
    ) -> None:
        self.explainer = explainer
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.lifecycle = lifecycle
        self.max_per_client = max_per_client or max_jobs
        self.max_upload_bytes = max_upload_bytes
        """Upload bytes that unfinished jobs may keep in all (None: no bound)."""
        self._jobs: dict[str, Job] = {}
        self._turns = asyncio.Semaphore(explainer.limiter.max_running)
        self._refusals = 0
        self._refusal_logged = -math.inf
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

    async def create(
        self,
        model: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        version: int | None = None,
        client: str = "",
    ) -> Job:
        """Check the parameters and the uploads' headers, then start the job; TooManyJobs when
        ``max_jobs`` jobs (or the client's ``max_per_client``) are queued or running, or their
        uploads fill ``max_upload_bytes``."""
        self.purge()
        active = [job for job in self._jobs.values() if not job.is_finished]
        mine = [job for job in active if job.client == client]
        if len(active) >= self.max_jobs:
            self._refuse(
                active,
                f"{len(active)} jobs are queued or running, the most at once "
                "(CAMSERVE_MAX_JOBS); retry after the seconds in Retry-After.",
            )
        if len(mine) >= self.max_per_client:
            self._refuse(
                mine,
                f"You have {len(mine)} jobs queued or running, the most one client may "
                "(CAMSERVE_MAX_JOBS_PER_CLIENT); wait for one to finish, or cancel one.",
            )
        size = sum(len(upload.data) for upload in uploads)
        if self.max_upload_bytes is not None:
            if size > self.max_upload_bytes:
                raise PayloadTooLarge(
                    f"The job's uploads are {size} bytes, over the {self.max_upload_bytes} all "
                    "jobs may keep (CAMSERVE_JOB_UPLOAD_BUDGET_BYTES); send fewer images."
                )
            kept = sum(job.upload_bytes for job in active)
            if kept + size > self.max_upload_bytes:
                self._refuse(
                    active,
                    f"Queued and running jobs keep {kept} bytes of uploads; this job's {size} "
                    "would go over CAMSERVE_JOB_UPLOAD_BUDGET_BYTES. Retry after the seconds in "
                    "Retry-After.",
                )
        await self.explainer.check_uploads(model, uploads, params, version)
        self._make_room()
        job = Job(id=secrets.token_urlsafe(18), client=client, upload_bytes=size)
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(
            self._run(job, model, list(uploads), params, version), name=f"job-{job.id[:8]}"
        )
        logger.info("job %s created (%d image(s))", job.id[:8], len(uploads))
        return job

    def _make_room(self) -> None:
        """Forget the oldest finished jobs until a new one fits."""
        finished = sorted(
            (job for job in self._jobs.values() if job.is_finished), key=lambda job: job.expires
        )
        for job in finished[: max(0, len(self._jobs) - self.max_jobs + 1)]:
            del self._jobs[job.id]

    def _refuse(self, blocking: Sequence[Job], message: str) -> NoReturn:
        """TooManyJobs, with Retry-After from when the first of the ``blocking`` jobs should
        end; logged at most once per ``_REFUSAL_LOG_EVERY_S``."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= _REFUSAL_LOG_EVERY_S:
            logger.warning(
                "refusing jobs: %s (%d refusal(s) since the last such line)",
                message,
                self._refusals,
            )
            self._refusal_logged = now
            self._refusals = 0
        etas = [eta for job in blocking if (eta := job.eta_s()) is not None]
        retry = math.ceil(min(etas)) if etas else self.explainer.limiter.retry_after()
        raise TooManyJobs(message, headers={"Retry-After": str(max(1, retry))})

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
        self._stop(job, JobCancelled.code, "Cancelled by DELETE /jobs/{id}.")
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

    async def _run(
        self,
        job: Job,
        model: str | None,
        uploads: list[Upload],
        params: ExplainParams,
        version: int | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:  # called in the pass thread
            loop.call_soon_threadsafe(job.on_progress, done, total)

        with self.lifecycle.track():
            try:
                async with self._turns:  # decoded only once the job can go on to its pass
                    result = await self.explainer.explain(
                        model, uploads, params, progress=report, admit=False, version=version
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
                        code=CamserveError.code,
                        message="Internal server error; the details are in the log.",
                    ),
                )
            else:
                job.finish("succeeded", self.ttl_s, result=result)
            finally:
                del uploads[:]  # the upload bytes are not kept with the result
        logger.info("job %s %s", job.id[:8], job.status)
