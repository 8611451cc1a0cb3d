"""One job as the process that holds or runs it sees it: status, times, progress, outcome."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from app.pipeline.results import ErrorDetail, ExplainResponse, JobProgress, JobStatus, JobView

FINISHED: frozenset[JobStatus] = frozenset({"succeeded", "failed", "cancelled"})


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    """A fresh job id: 18 random bytes in URL-safe base64 that never starts with '-'.

    An id like ``-T3x...`` reads as an option to every command line (``camserve jobs watch``,
    curl, shells), so those are drawn again.
    """
    while (job_id := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return job_id


def job_url(job_id: str) -> str:
    return f"/jobs/{job_id}"


@dataclass(eq=False)
class Job:
    """One explanation run in the background, and everything a client may ask about it."""

    id: str
    created: datetime = field(default_factory=now)
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
    """Bytes of its uploads, kept in this process until it ends (the memory store)."""
    revision: int = 0
    """Bumped on every change: the id of its latest event."""
    _progress_since: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_view(cls, view: JobView, client: str = "") -> Job:
        """The local copy of a job kept elsewhere (a worker runs it from this)."""
        return cls(
            id=view.id,
            created=view.created,
            status=view.status,
            started=view.started,
            finished=view.finished,
            done=view.progress.done,
            total=view.progress.total,
            error=view.error,
            client=client,
        )

    @property
    def url(self) -> str:
        return job_url(self.id)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def _touch(self) -> None:
        """Wake everyone waiting for a change, and arm a fresh event for the next one."""
        self.revision += 1
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
            self.started = now()
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
        self.finished = now()
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
