"""HTTP routers, one per concern."""

from typing import Any

from app.http.schemas import ErrorResponse


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}
