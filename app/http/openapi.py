"""Touches to the generated OpenAPI schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute

from app.http.routes.forms import explain_field_schemas, takes_explain_form
from app.http.routing import api_routes


def with_explain_fields(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """Add the explain parameters to the form body of each route that takes the explain form,
    after the route's own fields (``app.http.routes.forms`` declares them for the schema only)."""
    components = schema.get("components", {}).get("schemas", {})
    for route in api_routes(routes):
        body_model = route.body_field.field_info.annotation if route.body_field else None
        if body_model is not None and takes_explain_form(route):
            body = components[getattr(body_model, "__name__", "")]
            body["properties"] = {**body["properties"], **explain_field_schemas()}
    return schema


def form_fields_without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop ``null`` from the form bodies' optional fields.

    An optional form field is declared ``X | None`` in Python, which pydantic renders as
    ``anyOf: [X, {type: null}]`` with ``default: null``. A multipart part cannot carry a null:
    the field is simply left out. So the schema offers ``X``, and the default only when it is a
    value. A form field the route does not declare is refused (``app.pipeline.params``), which
    the schema says with ``additionalProperties: false``."""
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        if not name.startswith("Body_"):
            continue
        component["additionalProperties"] = False
        for prop in component.get("properties", {}).values():
            options = prop.get("anyOf")
            if options and {"type": "null"} in options:
                kept = [o for o in options if o != {"type": "null"}]
                del prop["anyOf"]
                if len(kept) == 1:
                    prop.update(kept[0])
                else:
                    prop["anyOf"] = kept
            if "default" in prop and prop["default"] is None:
                del prop["default"]
    return schema
