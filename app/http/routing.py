"""What the app's routes are made of, for the code that reads them: the routes inside included
routers, and a route's dependencies at any depth."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fastapi.routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

__all__ = ["api_routes", "depends_on", "endpoints"]


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


def api_routes(routes: Sequence[BaseRoute]) -> list[APIRoute]:
    """Every API route of ``routes``, inside the included routers too."""
    return [route for _, route in endpoints(routes) if isinstance(route, APIRoute)]


def depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    """Whether ``call`` is among the dependencies of ``dependant``, at any depth."""
    return any(d.call is call or depends_on(d, call) for d in dependant.dependencies)
