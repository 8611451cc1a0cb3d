"""``HEAD`` on every ``GET`` route: the same status and headers as a ``GET``, no body.

HTTP requires a server to answer ``HEAD`` wherever it answers ``GET`` (RFC 9110, 9.3.2), and
uptime checkers, load balancers and ``curl -I`` send it. FastAPI's routes take only the methods
they declare, so ``HEAD /health`` was a 405. This middleware runs the ``GET`` route and sends
its status and headers (``Content-Length`` included: what the ``GET`` would send) without the
body. Once the headers are sent the route is told its client went away, so a stream (a job's
event stream) ends at once rather than running on for nobody.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadMiddleware:
    """Answer ``HEAD`` as ``GET`` without the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        answered = False

        async def headers_only(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                await send(message)
            elif message["type"] == "http.response.body" and not answered:
                answered = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone_once_answered() -> Message:
            if answered:
                return {"type": "http.disconnect"}
            return await receive()

        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, gone_once_answered, headers_only)
        finally:
            if "route" in inner:  # the route the router matched, for the access log and metrics
                scope["route"] = inner["route"]
