"""What every job store does: the one interface the /jobs routes use, and the rules shared by
the backends (who may submit how many, what a refusal says, what an unknown id says)."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from app.errors import BadRequest, JobNotFound, TooManyJobs, clip
from app.observability.logs import Throttle
from app.pipeline.decoding import Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.results import JobStatus, JobView

logger = logging.getLogger(__name__)

_REFUSAL_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event of a job: ``progress`` (data: status and progress) or, last, the
    final status (data: the whole job). ``id`` is what a client sends back in Last-Event-ID."""

    id: str
    name: str
    data: str


@dataclass(frozen=True)
class StoreState:
    """What /ready says about the job store."""

    backend: str
    available: bool
    problem: str | None = None
    """Why the store is unavailable, and the fix, in one line (None while it is available)."""


class JobStore(ABC):
    """Jobs created on one replica and read, followed and cancelled on any (with a shared
    backend). Admission counts queued and running jobs only: at most ``max_jobs`` of them, and
    ``max_per_client`` per client."""

    backend: str = ""

    def __init__(self, max_jobs: int, ttl_s: float, max_per_client: int | None) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.max_per_client = max_per_client or max_jobs
        self._refusal_log = Throttle(_REFUSAL_LOG_EVERY_S)

    @abstractmethod
    async def start(self) -> None:
        """Start whatever runs in the background (workers, health checks)."""

    @abstractmethod
    async def close(self) -> None:
        """At shutdown: stop the background work; no job is dropped without a reason."""

    @abstractmethod
    async def create(
        self,
        model: str | None,
        uploads: Sequence[Upload],
        params: ExplainParams,
        model_version: int | None = None,
        client: str = "",
        scope: str | None = None,
    ) -> JobView:
        """Check the parameters and the uploads' headers, then queue the job (on
        ``model_version`` of the model, else its newest). TooManyJobs when the store is full.
        ``scope``: whose cached explanations the job may use and fill (``Explainer.explain``'s;
        None: everyone's)."""

    @abstractmethod
    async def get(self, job_id: str, owner: str | None = None) -> JobView:
        """The job with its result once finished; JobNotFound for an unknown or expired id, or
        a job that ``owner`` (when given) did not create."""

    @abstractmethod
    async def cancel(self, job_id: str, owner: str | None = None) -> JobView:
        """Cancel a queued or running job (its work stops at the next chunk) and return its
        final state; on a finished job, return that state and forget the job (JobNotFound
        after). The same on every backend: the shared contract tests hold them to it."""

    @abstractmethod
    def parse_event_id(self, last_event_id: str) -> object | None:
        """``last_event_id`` in the form this backend's events carry, or None when it is not
        one (never an exception: it is a header anyone can send)."""

    def check_event_id(self, last_event_id: str | None) -> None:
        """BadRequest for a Last-Event-ID that no event of this store could carry."""
        if last_event_id is not None and self.parse_event_id(last_event_id) is None:
            raise BadRequest(
                f"Last-Event-ID {clip(last_event_id)} is not an id this service sends; send "
                "back the id of the last event received, or none to start from the beginning."
            )

    @staticmethod
    def visible(client: str, owner: str | None) -> bool:
        """Whether a job made by ``client`` is shown to ``owner`` (None: to anyone who holds
        its id; with API keys, only the key that made it sees it)."""
        return owner is None or client == owner

    @abstractmethod
    def events(
        self, job_id: str, last_event_id: str | None, keep_alive_s: float
    ) -> AsyncIterator[JobEvent | None]:
        """The job's events after ``last_event_id`` (all when None): progress, then the final
        one. None when nothing happened for ``keep_alive_s``. A finished job yields its final
        event only."""

    @abstractmethod
    def counts(self) -> dict[JobStatus, int]:
        """How many jobs are kept, by status (every status listed, zeros included)."""

    def state(self) -> StoreState:
        return StoreState(self.backend, available=True)

    def check_admission(
        self, active: int, mine: int, etas: Sequence[float | None], retry_s: int
    ) -> None:
        """TooManyJobs when ``active`` jobs are queued or running, or ``mine`` of this client."""
        if active >= self.max_jobs:
            self._refuse(
                etas,
                retry_s,
                f"{active} jobs are queued or running, the most at once "
                "(CAMSERVE_MAX_JOBS); retry after the seconds in Retry-After.",
            )
        if mine >= self.max_per_client:
            self._refuse(
                etas,
                retry_s,
                f"You have {mine} jobs queued or running, the most one client may "
                "(CAMSERVE_MAX_JOBS_PER_CLIENT); wait for one to finish, or cancel one.",
            )

    def _refuse(self, etas: Sequence[float | None], retry_s: int, message: str) -> NoReturn:
        """TooManyJobs, with Retry-After from when the first blocking job should end (else
        ``retry_s``); logged at most once per ``_REFUSAL_LOG_EVERY_S``."""
        refused = self._refusal_log.due()
        if refused:
            logger.warning(
                "refusing jobs: %s (%d refusal(s) since the last such line)", message, refused
            )
        known = [eta for eta in etas if eta is not None]
        retry = math.ceil(min(known)) if known else retry_s
        raise TooManyJobs(message, headers={"Retry-After": str(max(1, retry))})

    def not_found(self, job_id: str) -> JobNotFound:
        return JobNotFound(
            f"No job {clip(job_id)}: it never existed, or it finished more than "
            f"{self.ttl_s:g} s ago (CAMSERVE_JOB_TTL_S) or was deleted. Submit it again."
        )
