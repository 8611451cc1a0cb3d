"""Pydantic's validation problems as one message that names each field and its problem."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from app.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def describe(errors: Iterable[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Validation errors (pydantic's or FastAPI's) -> one message, and the problems as a list."""
    problems = []
    for item in errors:
        place = [str(part) for part in item.get("loc", ())]
        # "file", "inputs.0.data": the field, without its place; the place for a whole body
        where = ".".join(p for p in place if p not in ("body", "query", "path"))
        where = where or (place[0] if place else "request")
        message = item.get("msg", "invalid")
        if item.get("type") == "missing":
            message = "is required" if where != "file" else "is required: attach an image file"
        problems.append({"field": where, "problem": message})
    text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return f"Invalid request: {text}. See /docs for the accepted parameters.", problems


def validated(model: type[M], data: Any) -> M:
    """``data`` (a decoded JSON object, or a transport's message converted to one) as ``model``;
    BadRequest naming every problem when it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise BadRequest(
            describe(error.errors(include_url=False, include_input=False))[0]
        ) from None
