"""The gate in front of the model routes, decided from the headers before any body is read:
the API key (401) and the drain after SIGTERM (503 ``shutting_down`` for new work). It also
counts the model routes' POSTs as in flight for the drain, from their headers to their answer.

A route is a model route when it depends on ``require_api_key``; that dependency stays on the
routes too, so the OpenAPI schema documents the key, and it is then checked a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi.dependencies.models import Dependant
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.deps import api_key_matches, require_api_key
from app.http.errors import send_refusal
from app.lifecycle import Lifecycle


def _depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


class GateMiddleware:
    """Refuse a model request on its headers alone: no key (when one is set), or draining.

    Under ``protocol_prefixes`` (the inference-protocol routes) refusals are ``{"error": ...}``."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        api_key: str | None,
        lifecycle: Lifecycle,
        protocol_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.routes = routes
        self.api_key = api_key
        self.lifecycle = lifecycle
        self.protocol_prefixes = protocol_prefixes
        self._guarded: dict[int, bool] = {}

    def _is_model_route(self, scope: Scope) -> bool:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                known = self._guarded.get(id(route))
                if known is None:
                    dependant = getattr(route, "dependant", None)
                    known = dependant is not None and _depends_on(dependant, require_api_key)
                    self._guarded[id(route)] = known
                return known
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        checks = self.api_key is not None or self.lifecycle.draining
        model_route = (checks or scope["method"] == "POST") and self._is_model_route(scope)
        if model_route and checks:
            protocol = bool(self.protocol_prefixes) and scope["path"].startswith(
                self.protocol_prefixes
            )
            if self.api_key is not None and not self._key_ok(scope):
                await send_refusal(
                    send,
                    401,
                    "unauthorized",
                    "Missing or wrong API key; send it in the X-API-Key header.",
                    protocol=protocol,
                    headers=[(b"www-authenticate", b"ApiKey")],
                )
                return
            if self.lifecycle.draining and scope["method"] == "POST":
                await send_refusal(
                    send,
                    503,
                    "shutting_down",
                    "The service is shutting down and takes no new work; retry on another replica.",
                    protocol=protocol,
                    headers=[(b"retry-after", b"1")],
                )
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
