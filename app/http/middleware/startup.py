"""A startup refused for a setting reaches the operator as one line, not a traceback.

The lifespan logs a ``ConfigurationError`` that stops startup (a CUDA device that is not there,
a Redis that refuses the job store) in one line naming the setting and the fix, and marks the
app (``refuse_start``). Starlette then reports the failure to the server with the whole
traceback as its message, which uvicorn logs after that line; for a refusal the message is
dropped here, so the log holds the line and uvicorn's "Application startup failed".
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("app.http.app")


def refuse_start(state: Any, error: Exception) -> None:
    """Log why startup stops (``error``: a ``ConfigurationError``) and mark ``state`` (the
    app's) so that ``QuietRefusal`` drops the traceback."""
    logger.critical("cannot start: %s", error)
    state.startup_refused = str(error)


class QuietRefusal:
    """Pure ASGI: on the lifespan, a ``lifespan.startup.failed`` of a refused start goes on
    without its message (the traceback); everything else passes untouched."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            refused = getattr(self.state, "startup_refused", None)
            if message["type"] == "lifespan.startup.failed" and refused:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, sending)
