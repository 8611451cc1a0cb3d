"""The cap on a request's headers: at most ``max_fields`` fields and ``max_bytes`` bytes of
names and values, else 431 ``headers_too_large`` before any other middleware looks at them.

Under ``python -m app`` the server's protocol (``app.http.server``) enforces the same cap while
the headers arrive, and closes the connection: a flood of a million tiny headers is cut after
the first ``max_fields`` instead of being parsed whole. This middleware is the same rule for
any other server (``uvicorn --factory``, h11, tests), where the headers reach the app parsed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import HeadersTooLarge
from app.http.errors import send_refusal


def headers_too_large(fields: int, size: int, max_fields: int, max_bytes: int) -> HeadersTooLarge:
    """The one refusal of headers over the cap, whoever counts them."""
    return HeadersTooLarge(
        f"The request has more than {max_fields} header fields or {max_bytes} bytes of headers "
        f"(counted so far: {fields} fields, {size} bytes; CAMSERVE_MAX_HEADER_FIELDS, "
        "CAMSERVE_MAX_HEADER_BYTES); send fewer or smaller headers.",
        details={"max_fields": max_fields, "max_bytes": max_bytes},
    )


class HeaderCapMiddleware:
    """Refuse a request whose headers are over the cap (431, JSON), on a count of
    ``scope["headers"]`` that stops at the first field past it."""

    def __init__(self, app: ASGIApp, max_fields: int, max_bytes: int) -> None:
        self.app = app
        self.max_fields = max_fields
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            fields = 0
            over = len(headers) > self.max_fields
            if not over:
                for name, value in headers:
                    fields += 1
                    size += len(name) + len(value)
                    if size > self.max_bytes:
                        over = True
                        break
            if over:
                error = headers_too_large(
                    max(fields, len(headers)), size, self.max_fields, self.max_bytes
                )
                await send_refusal(send, error)
                return
        await self.app(scope, receive, send)
