"""Stop a request's work when its client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from app.errors import ClientClosedRequest

T = TypeVar("T")

POLL_S = 0.05


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first.

    Cancelling drops a request that still waits for its batch; a pass already running in a
    worker thread finishes, and its answer is thrown away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ClientClosedRequest("The client closed the connection before the answer.")
    finally:
        if not task.done():
            task.cancel()
