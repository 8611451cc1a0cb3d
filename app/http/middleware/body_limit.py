"""ASGI middleware that bounds how a request body streams in: its size and its pace."""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTimeout, CamserveError, PayloadTooLarge
from app.http.errors import send_refusal

logger = logging.getLogger(__name__)


class _BodyRefused(Exception):
    """Raised into the app's body read; the middleware answers ``error`` in its place."""

    def __init__(self, error: CamserveError) -> None:
        super().__init__(error.message)
        self.error = error


class BodyLimitMiddleware:
    """Answer 413 once a body exceeds ``max_bytes`` (from Content-Length or from counting), and
    408 when the client leaves ``body_timeout_s`` between two pieces of its body.

    Paths under ``protocol_prefixes`` (the inference-protocol routes, whose images come base64
    in JSON) get ``protocol_max_bytes`` instead, and their refusals the protocols' shape."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        body_timeout_s: float = 30.0,
        protocol_prefixes: tuple[str, ...] = (),
        protocol_max_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.protocol_prefixes = protocol_prefixes
        self.protocol_max_bytes = protocol_max_bytes or max_bytes

    @staticmethod
    def _too_large(limit: int) -> _BodyRefused:
        return _BodyRefused(
            PayloadTooLarge(
                f"The request body is over {limit} bytes; send fewer or smaller "
                "images (CAMSERVE_MAX_UPLOAD_BYTES x CAMSERVE_MAX_IMAGES bounds it)."
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        protocol = bool(self.protocol_prefixes) and scope["path"].startswith(self.protocol_prefixes)
        limit = self.protocol_max_bytes if protocol else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(send, self._too_large(limit), protocol)
            return

        received = 0
        refused: _BodyRefused | None = None
        started = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, refused, body_done
            if body_done:  # after the body, only a disconnect is left to hear: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                logger.info(
                    "%s %s: no body data for %.0f s after %d bytes; answering 408",
                    scope["method"],
                    scope["path"],
                    self.body_timeout_s,
                    received,
                )
                refused = _BodyRefused(
                    BodyTimeout(
                        f"No part of the request body came for {self.body_timeout_s:g} s "
                        "(CAMSERVE_BODY_TIMEOUT_S); send the body without pausing."
                    )
                )
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refused = self._too_large(limit)
                    raise refused
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:
                return  # the app's answer to the aborted read is replaced by ours
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not started:
            await _refuse(send, refused, protocol)


async def _refuse(send: Send, refused: _BodyRefused, protocol: bool) -> None:
    await send_refusal(send, refused.error, protocol=protocol)
