"""The outermost middleware: a request id for every request, one access-log line, its metrics."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.context import REQUEST_ID_HEADER, RequestInfo, identity, start_request
from app.observability.logs import logged_field
from app.observability.metrics import UNMATCHED_ROUTE, Metrics

logger = logging.getLogger("app.http.middleware.access")

_HEADER = REQUEST_ID_HEADER.lower().encode()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


class AccessMiddleware:
    """Opens the request's context (its id from ``X-Request-ID`` when valid, else a new one),
    echoes the id on the answer, then writes the access line and feeds the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_id = dict(scope["headers"]).get(_HEADER, b"").decode("latin-1") or None
        info = start_request(client_id)
        peer = scope.get("client")
        info.caller = identity(peer[0] if peer else None)  # the gate names a key's client
        status = 500
        sent = 0
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = info.request_id
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            # An exception here becomes the 500 of the error handler outside this middleware,
            # which still sees this request's context (so its body and log carry the id).
            self._finish(scope, info, status, time.perf_counter() - started, received, sent)

    def _finish(
        self, scope: Scope, info: RequestInfo, status: int, seconds: float, received: int, sent: int
    ) -> None:
        method, path = logged_field(scope.get("method", "")), logged_field(scope.get("path", ""))
        logger.info(
            "%s %s %d %.1f ms model=%s method=%s images=%d bytes=%d",
            method,
            path,
            status,
            seconds * 1000,
            info.model or "-",
            info.method or "-",
            info.images,
            sent,
            extra={
                "access": {
                    "http_method": method,
                    "path": path,
                    "status": status,
                    "ms": round(seconds * 1000, 3),
                    "model": info.model or None,
                    "method": info.method or None,
                    "images": info.images,
                    "bytes": sent,
                    "bytes_in": received,
                }
            },
        )
        if self.metrics is not None:
            self.metrics.observe_request(_route(scope), status, seconds, info)
