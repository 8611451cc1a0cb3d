"""HTTP routers, one per concern."""

from typing import Annotated, Any

from fastapi import Form

from app.http.schemas import ErrorResponse


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}


VersionField = Annotated[
    int | None,
    Form(ge=1, description="the model's version; default: its newest ready version"),
]
"""The ``version`` form field of the model routes."""
