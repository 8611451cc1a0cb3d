"""The in-process job store (``CAMSERVE_JOB_STORE=memory``, the default): jobs live and run in
this process and are lost with it.

A job runs ``Explainer.explain`` as an asyncio task. Only as many jobs as there are model slots
go past their turn at once: a queued job holds its upload bytes only, and decodes them once its
turn comes. The pass thread reports progress through ``call_soon_threadsafe``; every change wakes
the job's followers. Cancelling the task stops the pass at its next chunk. Finished jobs are kept
for ``ttl_s`` while there is room, the oldest forgotten first when a new job needs its place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import get_args

from app.digits import whole_number
from app.errors import JobCancelled, PayloadTooLarge, ShuttingDown
from app.lifecycle import Lifecycle
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.jobs.base import JobEvent, JobStore
from app.pipeline.jobs.record import Job, new_job_id
from app.pipeline.jobs.work import check_result_size, result_over, run_job
from app.pipeline.results import ErrorDetail, JobStatus, JobView

logger = logging.getLogger(__name__)


class MemoryJobStore(JobStore):
    """At most ``max_jobs`` jobs kept: queued or running ones (``max_per_client`` of them per
    client), and finished ones for ``ttl_s`` while they leave room."""

    backend = "memory"

    def __init__(
        self,
        explainer: Explainer,
        max_jobs: int,
        ttl_s: float,
        lifecycle: Lifecycle,
        max_per_client: int | None = None,
        max_upload_bytes: int | None = None,
        max_result_bytes: int | None = None,
    ) -> None:
        super().__init__(max_jobs, ttl_s, max_per_client)
        self.explainer = explainer
        self.max_upload_bytes = max_upload_bytes
        """Upload bytes that unfinished jobs may keep in all (None: no bound)."""
        self.max_result_bytes = max_result_bytes
        """Largest result one job may keep, as the Redis store bounds it (None: no bound)."""
        self.lifecycle = lifecycle
        self._jobs: dict[str, Job] = {}
        self._turns = asyncio.Semaphore(explainer.limiter.max_running)
        lifecycle.on_cut(self._cut)

    async def start(self) -> None:
        """Nothing runs in the background: a job's task starts when it is created."""

    def counts(self) -> dict[JobStatus, int]:
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
        model_version: int | None = None,
        client: str = "",
        scope: str | None = None,
    ) -> JobView:
        size = sum(len(upload.data) for upload in uploads)
        self._admit(client, size)  # a full store refuses before the checks' work
        await self.explainer.check_uploads(model, uploads, params, model_version, job=True)
        if self.max_result_bytes is not None:
            check_result_size(
                self.explainer, model, uploads, params, self.max_result_bytes, model_version
            )
        # Again, with no await between this check and the job's place: the requests that
        # passed the first check together while the uploads were checked must not all get in.
        self._admit(client, size)
        self._make_room()
        job = Job(id=new_job_id(), client=client, upload_bytes=size)
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(
            self._run(job, model, list(uploads), params, model_version, scope),
            name=f"job-{job.id[:8]}",
        )
        logger.info("job %s created (%d image(s))", job.id[:8], len(uploads))
        return job.view()

    def _admit(self, client: str, size: int) -> None:
        """Refuse a job past the client's or the store's count of unfinished jobs (503
        ``too_many_jobs``), or whose uploads would go past what all jobs may keep. Synchronous:
        ``create`` calls it last right before the job takes its place."""
        self.purge()
        active = [job for job in self._jobs.values() if not job.is_finished]
        mine = [job for job in active if job.client == client]
        blocking = mine if len(active) < self.max_jobs else active
        self.check_admission(
            len(active),
            len(mine),
            [job.eta_s() for job in blocking],
            self.explainer.limiter.retry_after(),
        )
        self._check_upload_bytes(size, active)

    def _check_upload_bytes(self, size: int, active: list[Job]) -> None:
        """The uploads a queued job keeps in this process, against what all jobs may keep."""
        if self.max_upload_bytes is None:
            return
        if size > self.max_upload_bytes:
            raise PayloadTooLarge(
                f"The job's uploads are {size} bytes, over the {self.max_upload_bytes} all "
                "jobs may keep (CAMSERVE_JOB_UPLOAD_BUDGET_BYTES); send fewer images."
            )
        kept = sum(job.upload_bytes for job in active)
        if kept + size > self.max_upload_bytes:
            self._refuse(
                [job.eta_s() for job in active],
                self.explainer.limiter.retry_after(),
                f"Queued and running jobs keep {kept} bytes of uploads; this job's {size} "
                "would go over CAMSERVE_JOB_UPLOAD_BUDGET_BYTES. Retry after the seconds in "
                "Retry-After.",
            )

    def _make_room(self) -> None:
        """Forget the oldest finished jobs until a new one fits."""
        finished = sorted(
            (job for job in self._jobs.values() if job.is_finished), key=lambda job: job.expires
        )
        for job in finished[: max(0, len(self._jobs) - self.max_jobs + 1)]:
            del self._jobs[job.id]

    def _lookup(self, job_id: str, owner: str | None = None) -> Job:
        self.purge()
        job = self._jobs.get(job_id)
        if job is None or not self.visible(job.client, owner):
            raise self.not_found(job_id)
        return job

    async def get(self, job_id: str, owner: str | None = None) -> JobView:
        return self._lookup(job_id, owner).view()

    def parse_event_id(self, last_event_id: str) -> int | None:
        """A revision (``app.digits``), or None."""
        return whole_number(last_event_id)

    async def cancel(self, job_id: str, owner: str | None = None) -> JobView:
        job = self._lookup(job_id, owner)
        if job.is_finished:
            del self._jobs[job.id]
            return job.view()
        self._stop(job, JobCancelled.code, "Cancelled by DELETE /jobs/{id}.")
        return job.view()

    async def events(
        self, job_id: str, last_event_id: str | None, keep_alive_s: float
    ) -> AsyncIterator[JobEvent | None]:
        job = self._lookup(job_id)
        parsed = self.parse_event_id(last_event_id) if last_event_id else None
        seen = -1 if parsed is None else parsed
        last_state = None
        while True:
            if job.is_finished:
                yield JobEvent(str(job.revision), job.status, job.view().model_dump_json())
                return
            revision = job.revision
            state = job.view(with_result=False).model_dump_json(include={"status", "progress"})
            if revision > seen and state != last_state:
                yield JobEvent(str(revision), "progress", state)
                seen, last_state = revision, state
                continue  # the job may have changed while the follower had the event
            if not await job.changed(keep_alive_s):
                yield None

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
        model_version: int | None = None,
        scope: str | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()

        def report(done: int, total: int) -> None:  # called in the pass thread
            loop.call_soon_threadsafe(job.on_progress, done, total)

        with self.lifecycle.track():
            try:
                async with self._turns:  # decoded only once the job can go on to its pass
                    outcome = await run_job(
                        self.explainer,
                        model,
                        uploads,
                        params,
                        report,
                        job.id,
                        model_version,
                        scope,
                        client=job.client,
                    )
            except asyncio.CancelledError:
                # Cancelled by DELETE or the shutdown, which set the status.
                logger.info(
                    "job %s cancelled (%s)", job.id[:8], job.error.code if job.error else ""
                )
                return
            finally:
                del uploads[:]  # the upload bytes are not kept with the result
            if self.max_result_bytes is not None:
                outcome = result_over(outcome, self.max_result_bytes)
            job.finish(outcome.status, self.ttl_s, result=outcome.result, error=outcome.error)
        logger.info("job %s %s", job.id[:8], job.status)
