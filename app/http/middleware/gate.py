"""The gate in front of the model routes, decided from the headers before any body is read:
the API key (401), the page's origin (403 ``origin_not_allowed``: a page of another origin
gets no work done) and the drain after SIGTERM (503 ``shutting_down`` for new work). It also
counts the model routes' POSTs as in flight for the drain, from their headers to their answer.

A refusal reads no byte of the body into the app, but it does not leave the body unread in the
socket either: closing a connection with unread data makes the kernel reset it, and a client
that sends its whole body before it reads (httpx, asyncio clients) then sees the reset instead
of the answer. So the answer goes out at once, then up to ``DRAIN_BYTES`` of the body are read
and thrown away (for at most ``DRAIN_S``), then the connection is closed cleanly. A body
declared larger than that is not read: its sender may see a reset.

Which routes it covers is read from the routes themselves, the app's live list, so there is no
second list to forget: a route is gated when it takes a POST (every POST of the service starts
model work) or depends on ``require_api_key``. That dependency stays on the routes too, so the
OpenAPI schema documents the key, and it is then checked a second time. The repository API's
routes (``require_admin_key``) have a key of their own instead of the API key; the drain still
covers them. A ``ProtocolRoute`` (KServe v1, OIP v2) gets its refusals in the protocols' shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.digits import whole_number
from app.errors import CamserveError, OriginNotAllowed, ShuttingDown, Unauthorized
from app.http.admin import require_admin_key
from app.http.deps import ApiKeys, api_key_matches, require_api_key
from app.http.errors import send_refusal
from app.http.protocols.base import ProtocolRoute
from app.http.routing import depends_on, endpoints
from app.lifecycle import Lifecycle
from app.observability.context import current_request, identity

__all__ = ["DRAIN_BYTES", "DRAIN_S", "GateMiddleware", "api_key_matches"]

#: Most body bytes read (and dropped) after a refusal, so the client sees the answer, not a reset.
DRAIN_BYTES = 16 * 1024 * 1024
#: Most seconds spent reading them.
DRAIN_S = 10.0
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The port of an origin that names none (a browser leaves the default out of Origin and Host).
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_gated(route: BaseRoute) -> bool:
    """Whether the gate covers ``route``: it takes a POST, or it depends on the API key."""
    if "POST" in (getattr(route, "methods", None) or ()):
        return True
    dependant = getattr(route, "dependant", None)
    return dependant is not None and depends_on(dependant, require_api_key)


def takes_api_key(route: BaseRoute) -> bool:
    """Whether a gated ``route`` asks for the API key: all do but the repository API's, which
    asks for the admin key (``require_admin_key``) instead."""
    dependant = getattr(route, "dependant", None)
    return not (dependant is not None and depends_on(dependant, require_admin_key))


class GateMiddleware:
    """Refuse a model request on its headers alone: no key (when keys are set), a page of an
    origin not allowed, or draining.

    ``routes`` is the app's own route list (read at each request, so routes added later count).
    ``allowed_origins``: the origins of ``CAMSERVE_CORS_ORIGINS`` (``*``: any); a request from
    its own origin, or with no ``Origin`` (not a browser page), is never refused for it."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        api_keys: ApiKeys,
        lifecycle: Lifecycle,
        allowed_origins: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.routes = routes
        self.api_keys = api_keys
        self.lifecycle = lifecycle
        self.any_origin = "*" in allowed_origins
        self.allowed_origins = frozenset(o.rstrip("/").encode("latin-1") for o in allowed_origins)
        self._gated: dict[int, tuple[bool, bool]] = {}

    def _gated_route(self, scope: Scope) -> tuple[BaseRoute, bool] | None:
        """The route ``scope`` goes to, when the gate covers it, and whether it takes the API
        key."""
        for matcher, route in endpoints(self.routes):
            match, _ = matcher.matches(scope)
            if match is Match.FULL:
                gated = self._gated.get(id(route))
                if gated is None:
                    gated = self._gated[id(route)] = (is_gated(route), takes_api_key(route))
                return (route, gated[1]) if gated[0] else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        unsafe = scope["method"] not in _SAFE_METHODS
        foreign = unsafe and b"origin" in headers and not self._origin_ok(headers)
        checks = self.api_keys.required or self.lifecycle.draining or foreign
        gated = self._gated_route(scope) if checks or scope["method"] == "POST" else None
        if gated is not None and checks:
            refusal = self._refusal(scope, headers, gated[1], foreign)
            if refusal is not None:
                scope["route"] = gated[0]  # the access log and the metrics name the route
                protocol = isinstance(gated[0], ProtocolRoute)
                await _refuse(scope, headers, receive, send, refusal, protocol)
                return
        if gated is not None and scope["method"] == "POST":
            # Work counts as in flight from its headers on, so a drain that starts while its
            # body is still arriving waits for it, until the cut.
            protocol = isinstance(gated[0], ProtocolRoute)
            with self.lifecycle.track():
                await _cut_while_uploading(self.app, scope, receive, send, self.lifecycle, protocol)
            return
        await self.app(scope, receive, send)

    def _refusal(
        self, scope: Scope, headers: dict[bytes, bytes], keyed: bool, foreign: bool
    ) -> CamserveError | None:
        if keyed and self.api_keys.required:
            name = self.api_keys.name_of(headers.get(b"x-api-key"))
            info = current_request()
            if info is not None:
                info.client = name or "-"
                info.caller = identity(None, name, keyed=True)
            if name is None:
                return Unauthorized(
                    "Missing or wrong API key; send it in the X-API-Key header.",
                    headers={"WWW-Authenticate": "ApiKey"},
                )
        if foreign:
            origin = headers[b"origin"].decode("latin-1")
            return OriginNotAllowed(
                f"Pages of the origin {origin[:80]!r} may not use this service; add the origin "
                "to CAMSERVE_CORS_ORIGINS, or call it from the page's own server.",
            )
        if self.lifecycle.draining and scope["method"] == "POST":
            return ShuttingDown(
                "The service is shutting down and takes no new work; retry on another replica.",
                headers={"Retry-After": "1"},
            )
        return None

    def _origin_ok(self, headers: dict[bytes, bytes]) -> bool:
        """Whether a browser page of the request's ``Origin`` may have work done: an origin of
        ``CAMSERVE_CORS_ORIGINS``, or the service's own: the origin's host name is the Host
        header's, and so is its port when Host names one (a page on another port of the same
        host is another site: any other service there, a dev server, a local tool). The scheme
        is not compared, nor the port when Host has none: behind a gateway that terminates TLS,
        or that passes ``Host`` without the port (nginx's ``$host``), they differ from the
        page's."""
        origin = headers[b"origin"].rstrip(b"/")
        if self.any_origin or origin in self.allowed_origins:
            return True
        try:
            page = urlsplit(origin.decode("latin-1"))
            own = urlsplit("//" + headers.get(b"host", b"").decode("latin-1"))
            page_port = page.port or _DEFAULT_PORTS.get(page.scheme)
            own_port = own.port
        except ValueError:
            return False
        same_host = page.hostname is not None and page.hostname == own.hostname
        return same_host and (own_port is None or own_port == page_port)


class _CutWhileUploading(Exception):
    """Raised into the app's body read when the drain's cut comes while the body arrives."""


async def _cut_while_uploading(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    lifecycle: Lifecycle,
    protocol: bool,
) -> None:
    """Run ``app``, but answer 503 ``shutting_down`` (JSON) if the drain's cut comes while the
    request's body is still arriving. Cut work is stopped by ``app.http.cutoff``, which waits
    for the cut only once the body is read: a body trickling in at the allowed pace past the
    grace kept its request until uvicorn cancelled it, with a plain-text 500."""
    body_done = False
    started = False
    cut_off = False
    cut: asyncio.Future[Any] | None = None

    async def receive_until_cut() -> Message:
        nonlocal body_done, cut, cut_off
        if body_done:
            return await receive()
        if cut is None:
            cut = asyncio.ensure_future(lifecycle.cut.wait())
        message = asyncio.ensure_future(receive())
        await asyncio.wait({message, cut}, return_when=asyncio.FIRST_COMPLETED)
        if not message.done():
            message.cancel()
            cut_off = True
            raise _CutWhileUploading
        received: Message = message.result()
        body_done = received["type"] != "http.request" or not received.get("more_body", False)
        return received

    async def watched_send(message: Message) -> None:
        nonlocal started
        if cut_off and not started:
            return  # the app's answer to the aborted read is replaced by ours
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive_until_cut, watched_send)
    except Exception:
        if not cut_off or started:
            raise
    finally:
        if cut is not None and not cut.done():
            cut.cancel()
    if cut_off and not started:
        await send_refusal(
            send,
            ShuttingDown(
                "The service is shutting down and this request's body was still arriving when "
                "its grace period ran out; retry it on another replica, sending the body at "
                "once.",
                headers={"Retry-After": "1"},
            ),
            protocol=protocol,
        )


async def _refuse(
    scope: Scope,
    headers: dict[bytes, bytes],
    receive: Receive,
    send: Send,
    error: CamserveError,
    protocol: bool,
) -> None:
    """Send ``error``; then, if the request has a body the client may still be sending, read
    and drop up to ``DRAIN_BYTES`` of it before the answer ends (and the connection closes)."""
    if not _drainable(headers):
        await send_refusal(send, error, protocol=protocol)
        return

    async def held(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "more_body": True}  # ended once the body is read
        await send(message)

    await send_refusal(held, error, protocol=protocol)
    await _drain(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _drainable(headers: dict[bytes, bytes]) -> bool:
    """A body is coming, of a size worth reading: declared up to ``DRAIN_BYTES``, or chunked.
    Not when the client waits for ``100 Continue`` (it sends nothing unless asked)."""
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return False
    declared = headers.get(b"content-length")
    if declared is not None:
        length = whole_number(declared)
        return length is not None and 0 < length <= DRAIN_BYTES
    return b"chunked" in headers.get(b"transfer-encoding", b"").lower()


async def _drain(receive: Receive) -> None:
    async def read() -> None:
        read = 0
        while read <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read(), DRAIN_S)
    except asyncio.TimeoutError:
        return
