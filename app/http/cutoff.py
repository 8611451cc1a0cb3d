"""Stop a synchronous request's work when its client leaves, its deadline passes, or the
service's shutdown grace runs out: the work is cancelled (a running pass stops at its next
chunk) and the request answers 499, 504 or 503."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from app.errors import CamserveError, ClientClosedRequest, RequestTimeout, ShuttingDown
from app.lifecycle import Lifecycle

T = TypeVar("T")

POLL_S = 0.05


async def guarded(
    request: Request,
    work: Coroutine[Any, Any, T],
    *,
    timeout_s: float | None = None,
    lifecycle: Lifecycle | None = None,
    timeout_source: str = "CAMSERVE_REQUEST_TIMEOUT_S",
) -> T:
    """Await ``work`` unless the client disconnects, ``timeout_s`` passes or the shutdown cuts
    in; in each of those cases cancel it and raise the matching error. ``timeout_source``: what
    set the deadline, as the 504 names it."""
    task = asyncio.ensure_future(work)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            stop = await _reason_to_stop(request, deadline, timeout_s, lifecycle, timeout_source)
            if stop is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise stop
    finally:
        if not task.done():
            task.cancel()


async def _reason_to_stop(
    request: Request,
    deadline: float | None,
    timeout_s: float | None,
    lifecycle: Lifecycle | None,
    timeout_source: str,
) -> CamserveError | None:
    if await request.is_disconnected():
        return ClientClosedRequest("The client closed the connection before the answer.")
    if deadline is not None and time.monotonic() >= deadline:
        return RequestTimeout(
            f"The request took longer than {timeout_s:g} s ({timeout_source}) and was "
            "stopped. Run long explanations as a job: POST the same form to /jobs, then follow "
            "GET /jobs/{id} or /jobs/{id}/events."
        )
    if lifecycle is not None and lifecycle.cut.is_set():
        return ShuttingDown(
            "The service is shutting down and this request ran past its grace period; "
            "retry it on another replica.",
            headers={"Retry-After": "1"},
        )
    return None
