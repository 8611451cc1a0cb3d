"""The gate in front of the model routes, decided from the headers before any body is read:
the API key (401) and the drain after SIGTERM (503 ``shutting_down`` for new work). It also
counts the model routes' POSTs as in flight for the drain, from their headers to their answer.

Which routes it covers is read from the routes themselves, the app's live list, so there is no
second list to forget: a route is gated when it takes a POST (every POST of the service starts
model work) or depends on ``require_api_key``. That dependency stays on the routes too, so the
OpenAPI schema documents the key, and it is then checked a second time. The repository API's
routes (``require_admin_key``) have a key of their own instead of the API key; the drain still
covers them. A ``ProtocolRoute`` (KServe v1, OIP v2) gets its refusals in the protocols' shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import fastapi.routing
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ShuttingDown, Unauthorized
from app.http.admin import require_admin_key
from app.http.deps import api_key_matches, require_api_key
from app.http.errors import send_refusal
from app.http.protocols.base import ProtocolRoute, depends_on
from app.lifecycle import Lifecycle


def endpoints(routes: Sequence[BaseRoute]) -> Iterator[tuple[Any, BaseRoute]]:
    """Every route of ``routes`` with what matches a request to it, routes of included routers
    too: recent FastAPI keeps an included router whole in the app's list (one entry holding
    its routes), older ones copy its routes into the list."""
    walk = getattr(fastapi.routing, "iter_route_contexts", None)
    if walk is None:
        yield from ((route, route) for route in routes)
        return
    for context in walk(routes):
        yield context, context.original_route


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
    """Refuse a model request on its headers alone: no key (when one is set), or draining.

    ``routes`` is the app's own route list (read at each request, so routes added later count)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        api_key: str | None,
        lifecycle: Lifecycle,
    ) -> None:
        self.app = app
        self.routes = routes
        self.api_key = api_key
        self.lifecycle = lifecycle
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
        checks = self.api_key is not None or self.lifecycle.draining
        gated = self._gated_route(scope) if checks or scope["method"] == "POST" else None
        model_route = gated is not None
        if gated is not None and checks:
            route, keyed = gated
            protocol = isinstance(route, ProtocolRoute)
            if keyed and self.api_key is not None and not self._key_ok(scope):
                unauthorized = Unauthorized(
                    "Missing or wrong API key; send it in the X-API-Key header.",
                    headers={"WWW-Authenticate": "ApiKey"},
                )
                await send_refusal(send, unauthorized, protocol=protocol)
                return
            if self.lifecycle.draining and scope["method"] == "POST":
                draining = ShuttingDown(
                    "The service is shutting down and takes no new work; retry on another replica.",
                    headers={"Retry-After": "1"},
                )
                await send_refusal(send, draining, protocol=protocol)
                return
        if model_route and scope["method"] == "POST":
            # Work counts as in flight from its headers on, so a drain that starts while its
            # body is still arriving waits for it.
            with self.lifecycle.track():
                await self.app(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _key_ok(self, scope: Scope) -> bool:
        sent = dict(scope["headers"]).get(b"x-api-key")
        return self.api_key is not None and api_key_matches(sent, self.api_key)
