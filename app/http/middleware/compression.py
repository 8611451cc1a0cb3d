"""Answer compression for the inference-protocol routes: Starlette's ``GZipMiddleware``, on the
paths under ``/v1`` and ``/v2`` only.

Their answers are JSON of numbers (logits, maps), which gzip shrinks to a third. The native
routes' JSON answers carry their pictures as base64, which gzip shrinks by a quarter at about
50 ms per MB of CPU (level 5), and httpx asks for gzip by default: there it would cost more
than it saves, so those answers go as they are.
"""

from __future__ import annotations

from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class ProtocolCompression:
    """``GZipMiddleware(minimum_size, compresslevel)`` for the paths under ``prefixes``."""

    def __init__(
        self, app: ASGIApp, prefixes: tuple[str, ...], minimum_size: int, compresslevel: int
    ) -> None:
        self.app = app
        self.prefixes = prefixes
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size, compresslevel=compresslevel)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith(self.prefixes):
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)
