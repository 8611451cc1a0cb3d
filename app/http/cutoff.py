"""Stop a synchronous request's work when its client leaves, its deadline passes, or the
service's shutdown grace runs out: the work is cancelled (a running pass stops at its next
chunk) and the request answers 499, 504 or 503."""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from app.errors import CamserveError, ClientClosedRequest, RequestTimeout, ShuttingDown
from app.lifecycle import Lifecycle

T = TypeVar("T")

FORM_ADVICE = (
    "Run long explanations as a job: POST the same form to /jobs, then follow GET /jobs/{id} or "
    "/jobs/{id}/events."
)
"""What a 504 of camserve's own routes advises (their forms are what /jobs takes)."""
PROTOCOL_ADVICE = (
    "Run long explanations as a job: POST the images as a form, with the same parameters, to "
    "camserve's /jobs (the inference protocols have no jobs), then follow GET /jobs/{id}."
)
"""What a 504 of the inference-protocol routes advises: their bodies are not /jobs' form."""


async def guarded(
    request: Request,
    work: Coroutine[Any, Any, T],
    *,
    timeout_s: float | None = None,
    lifecycle: Lifecycle | None = None,
    timeout_source: str = "CAMSERVE_REQUEST_TIMEOUT_S",
    advice: str = FORM_ADVICE,
) -> T:
    """Await ``work`` unless the client disconnects, ``timeout_s`` passes or the shutdown cuts
    in; in each of those cases cancel it and raise the matching error. ``timeout_source``: what
    set the deadline, as the 504 names it; ``advice``: what the 504 says to do instead.

    Nothing polls: the work, a reader of the connection's next ASGI message (the body has been
    read, so the next one is ``http.disconnect``), the shutdown's cut and the deadline's timer
    are awaited together. Polling ``Request.is_disconnected`` 20 times a second cost every
    request in flight a few hundred microseconds of the event loop each time (it opens and
    cancels a cancel scope, which formats the task's repr), on the loop every request shares."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    cut = asyncio.ensure_future(lifecycle.cut.wait()) if lifecycle is not None else None
    waits = {task, gone} if cut is None else {task, gone, cut}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _reason_to_stop(gone in done, timeout_s, cut in done, timeout_source, advice)
    finally:
        for waiting in waits:
            if not waiting.done():
                waiting.cancel()


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone (``http.disconnect``, or a connection that fails to
    read); a request message (a body the route left unread) is passed over."""
    try:
        while (await receive()).get("type") != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a broken connection: the client is as good as gone
        return


def _reason_to_stop(
    gone: bool, timeout_s: float | None, cut: bool, timeout_source: str, advice: str
) -> CamserveError:
    if gone:
        return ClientClosedRequest("The client closed the connection before the answer.")
    if not cut:
        return RequestTimeout(
            f"The request took longer than {timeout_s:g} s ({timeout_source}) and was "
            f"stopped. {advice}"
        )
    return ShuttingDown(
        "The service is shutting down and this request ran past its grace period; "
        "retry it on another replica.",
        headers={"Retry-After": "1"},
    )
