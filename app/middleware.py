"""ASGI middleware that stops oversized request bodies while they stream in."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Answer 413 once a body exceeds ``max_bytes``, from Content-Length or from counting.

    Paths under ``protocol_prefixes`` (the inference-protocol routes, whose images come base64
    in JSON) get ``protocol_max_bytes`` instead, and their 413 has the protocols' shape."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        protocol_prefixes: tuple[str, ...] = (),
        protocol_max_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.protocol_prefixes = protocol_prefixes
        self.protocol_max_bytes = protocol_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        protocol = bool(self.protocol_prefixes) and scope["path"].startswith(self.protocol_prefixes)
        limit = self.protocol_max_bytes if protocol else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit, protocol)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to the aborted read is replaced by our 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._reject(send, limit, protocol)

    async def _reject(self, send: Send, limit: int, protocol: bool) -> None:
        message = (
            f"The request body is over {limit} bytes; send fewer or smaller "
            "images (CAMSERVE_MAX_UPLOAD_BYTES x CAMSERVE_MAX_IMAGES bounds it)."
        )
        shaped = {"error": message} if protocol else error_body("payload_too_large", message)
        body = json.dumps(shaped).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
