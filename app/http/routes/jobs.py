"""Explanations as jobs: submit, follow (JSON or Server-Sent Events), cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.http.deps import client_identity, get_settings, read_uploads, require_api_key
from app.http.routes import VersionField, error_responses
from app.http.routes.forms import ExplainForm, explain_form
from app.http.schemas import JobCreated
from app.pipeline.jobs import JobEvent, JobStore
from app.pipeline.results import JobView
from app.settings import Settings

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_api_key)])

#: A comment line this often keeps proxies from closing a quiet event stream.
KEEP_ALIVE_S = 15.0


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


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
        form.model, uploads, form.params, version, client=client_identity(request)
    )
    body = JobCreated(id=job.id, status=job.status, url=job.url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": job.url})


@router.get("/jobs/{job_id}", response_model=JobView, responses=error_responses(401, 404, 503))
async def get_job(job_id: str, jobs: JobStore = Depends(get_jobs)) -> JobView:
    """A job's status, progress with ETA, times, and its result or error once finished."""
    return await jobs.get(job_id)


@router.delete("/jobs/{job_id}", response_model=JobView, responses=error_responses(401, 404, 503))
async def cancel_job(job_id: str, jobs: JobStore = Depends(get_jobs)) -> JobView:
    """Cancel a queued or running job (its work stops at the next chunk); forget a finished one."""
    return await jobs.cancel(job_id)


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`progress` events, then one event named after the final status "
            "whose data is the whole job; each has an `id` to send back in Last-Event-ID",
        },
        **error_responses(401, 404, 503),
    },
)
async def follow_job(
    job_id: str,
    jobs: JobStore = Depends(get_jobs),
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> StreamingResponse:
    """Stream a job's progress as Server-Sent Events, ending with its final status; resumable
    with Last-Event-ID."""
    await jobs.get(job_id)  # 404 before the stream starts
    return StreamingResponse(
        _sse(jobs.events(job_id, last_event_id, KEEP_ALIVE_S)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _sse(events: AsyncIterator[JobEvent | None]) -> AsyncIterator[str]:
    async for event in events:
        if event is None:
            yield ": keep-alive\n\n"
        else:
            yield f"id: {event.id}\nevent: {event.name}\ndata: {event.data}\n\n"
