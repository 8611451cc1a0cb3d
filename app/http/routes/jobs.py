"""Explanations as jobs: submit, follow (JSON or Server-Sent Events), cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.errors import TooManyStreams
from app.http.answers import json_answer
from app.http.deps import client_identity, get_settings, job_owner, read_uploads, require_api_key
from app.http.routes import VersionField, error_responses
from app.http.routes.forms import ExplainForm, explain_form
from app.http.schemas import JobCreated
from app.pipeline.jobs import JobEvent, JobStore
from app.pipeline.results import JobView
from app.settings import Settings

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)])

#: A comment line this often keeps proxies from closing a quiet event stream.
KEEP_ALIVE_S = 15.0


#: Retry-After of a stream refused for the cap: a stream ends with its job, or on a reconnect.
STREAM_RETRY_S = 5


class StreamSlots:
    """The event streams open on this replica: at most ``total``, ``per_client`` per client.
    One past either gets 429 ``too_many_streams`` (a stream holds a task and, with Redis, a
    connection for as long as its job runs)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: dict[str, int] = {}

    def take(self, client: str) -> StreamSlot:
        mine = self._by_client.get(client, 0)
        if self.open >= self.total:
            raise self._refusal(
                f"This replica has {self.open} job event streams open, the most it keeps "
                "(CAMSERVE_MAX_EVENT_STREAMS)"
            )
        if mine >= self.per_client:
            raise self._refusal(
                f"You have {mine} job event streams open, the most one client may "
                "(CAMSERVE_MAX_EVENT_STREAMS_PER_CLIENT); close one, or poll GET /jobs/{id}"
            )
        self.open += 1
        self._by_client[client] = mine + 1
        return StreamSlot(self, client)

    def _release(self, client: str) -> None:
        self.open -= 1
        left = self._by_client[client] - 1
        if left:
            self._by_client[client] = left
        else:
            del self._by_client[client]

    def _refusal(self, message: str) -> TooManyStreams:
        return TooManyStreams(
            f"{message}; retry after the seconds in Retry-After.",
            headers={"Retry-After": str(STREAM_RETRY_S)},
        )


class StreamSlot:
    """One open stream's place; ``release`` gives it back (once, however often called)."""

    def __init__(self, slots: StreamSlots, client: str) -> None:
        self._slots: StreamSlots | None = slots
        self._client = client

    def release(self) -> None:
        if self._slots is not None:
            self._slots._release(self._client)
            self._slots = None


async def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


async def get_streams(request: Request) -> StreamSlots:
    return request.app.state.streams


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobCreated,
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
)
async def create_job(
    request: Request,
    form: ExplainForm = Depends(explain_form),
    version: VersionField = None,
    jobs: JobStore = Depends(get_jobs),
    settings: Settings = Depends(get_settings),
) -> JSONResponse:
    """Run an explanation in the background (same form as /explain); follow it at `url`."""
    uploads = await read_uploads(form.files, settings)
    job = await jobs.create(
        form.model,
        uploads,
        form.params,
        version,
        client=client_identity(request),
        scope=job_owner(request),
    )
    body = JobCreated(id=job.id, status=job.status, url=job.url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": job.url})


@router.get("/jobs/{job_id}", response_model=JobView, responses=error_responses(401, 404, 503))
async def get_job(
    request: Request, job_id: str, jobs: JobStore = Depends(get_jobs)
) -> StreamingResponse:
    """A job's status, progress with ETA, times, and its result or error once finished."""
    return await json_answer(await jobs.get(job_id, job_owner(request)))


@router.delete("/jobs/{job_id}", response_model=JobView, responses=error_responses(401, 404, 503))
async def cancel_job(
    request: Request, job_id: str, jobs: JobStore = Depends(get_jobs)
) -> StreamingResponse:
    """Cancel a queued or running job (its work stops at the next chunk) and answer its final
    state; on a finished job, answer that state and forget the job (then 404)."""
    return await json_answer(await jobs.cancel(job_id, job_owner(request)))


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`progress` events, then one event named after the final status "
            "whose data is the whole job; each has an `id` to send back in Last-Event-ID",
        },
        **error_responses(400, 401, 404, 429, 503),
    },
)
async def follow_job(
    request: Request,
    job_id: str,
    jobs: JobStore = Depends(get_jobs),
    streams: StreamSlots = Depends(get_streams),
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> StreamingResponse:
    """Stream a job's progress as Server-Sent Events, ending with its final status; resumable
    with Last-Event-ID."""
    jobs.check_event_id(last_event_id)  # 400 before the stream starts
    await jobs.get(job_id, job_owner(request))  # 404 too
    slot = streams.take(client_identity(request))  # 429 past the caps
    return StreamingResponse(
        _sse(jobs.events(job_id, last_event_id, KEEP_ALIVE_S), slot),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _sse(events: AsyncIterator[JobEvent | None], slot: StreamSlot) -> AsyncIterator[str]:
    try:
        async for event in events:
            if event is None:
                yield ": keep-alive\n\n"
            else:
                yield f"id: {event.id}\nevent: {event.name}\ndata: {event.data}\n\n"
    finally:
        slot.release()
