"""The headers that tell a browser what an answer may do: on every answer, ``nosniff``, no
``Referer`` and no framing; and a Content-Security-Policy, the strictest one unless the route
set its own (the page and the API docs do, from ``page_policy``).

The answers echo what clients and the model store write (a model's name in a 404, its labels,
an upload's filename): the page inserts them as text, and the policy is the second wall, so a
string that ever reached the page's HTML would still run no script. A JSON, PNG or event-stream
answer opened in a tab, or in a frame of a hostile page, may load and run nothing at all.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: What every answer without a policy of its own gets: no script, style, picture or request of
#: any kind, and no frame around it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"

_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors 'none' for browsers that predate CSP 2
}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def page_policy(html: str = "", *, inline_styles: bool = False) -> str:
    """The policy of an HTML page the service serves: everything from the service itself, the
    pictures it draws from ``data:`` and ``blob:`` URLs, and of inline scripts only those of
    ``html`` itself, each allowed by its hash (so a script injected later never runs).
    ``inline_styles`` lets scripts add ``<style>`` elements (ReDoc's styled-components do)."""
    hashes = [
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in _INLINE_SCRIPT.findall(html)
    ]
    directives: Iterable[tuple[str, str]] = (
        ("default-src", "'self'"),
        ("script-src", " ".join(["'self'", *hashes])),
        ("style-src", "'self' 'unsafe-inline'" if inline_styles else "'self'"),
        ("img-src", "'self' data: blob:"),
        ("connect-src", "'self'"),
        ("worker-src", "'self' blob:"),  # ReDoc's search runs in a worker made from a blob
        ("object-src", "'none'"),
        ("base-uri", "'none'"),
        ("form-action", "'self'"),
        ("frame-ancestors", "'none'"),
    )
    return "; ".join(f"{name} {value}" for name, value in directives)


class SecurityHeaders:
    """Add the headers above to every HTTP answer; a header the app set stays as it is."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("Content-Security-Policy", API_POLICY)
            await send(message)

        await self.app(scope, receive, with_headers)
