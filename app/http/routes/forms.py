"""The multipart form of an explanation, shared by ``POST /explain`` and ``POST /jobs``.

Its fields are ``app.pipeline.params.PARAMETERS`` (the general ones and every method's options),
read as the form sends them and handed to ``build_params`` like every other protocol's.

The route's own fields (the files, ``model``, ``version``) are the ones its signature declares;
every other part of the form, known or not, goes as text to ``read_text`` and ``build_params``,
which refuse an unknown name, a repeated one-value field and a number in other digits than
ASCII, with the same message as on every protocol. So the explain fields are declared for the
schema only (``explain_field_schemas``, which ``app.http.openapi`` puts in the form bodies of
the routes that take this form): FastAPI does not type them, ``app.pipeline.params`` reads
them. Declared to FastAPI as form parameters of a dependency, they were looked up and validated
one by one, 35 of them, at every request: about 2 ms of the event loop's CPU, a sixth of what a
small model's request costs it."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, get_args, get_origin

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from app.errors import NotAcceptable
from app.http.negotiation import prefers
from app.http.routing import depends_on
from app.pipeline.explainer import ExplainParams
from app.pipeline.params import (
    PARAMETERS,
    ExplainParameter,
    build_params,
    one_value,
    read_text,
    unknown_name,
)

#: An ``Accept: image/png`` answer is the overlay itself, drawn as a PNG.
_PNG_ANSWER = {"output": "overlay", "image_format": "png"}


@dataclass(frozen=True)
class ExplainForm:
    """The form, parsed: the file parts, the model's name and the explain parameters."""

    files: list[UploadFile]
    model: str | None
    params: ExplainParams
    as_png: bool
    """The client asked for the overlay itself (``Accept: image/png``), not JSON."""


def _form_field(parameter: ExplainParameter) -> inspect.Parameter:
    """One form field for a parameter, for the schema: its type, bounds and default are
    documented here; ``app.pipeline.params`` reads and checks the value, as on every protocol."""
    description = parameter.help + (
        " (ints, repeat or comma list)" if parameter.option and parameter.kind == "ints" else ""
    )
    annotation = Annotated[
        Any, Form(description=description, json_schema_extra=parameter.form_schema())
    ]
    return inspect.Parameter(
        parameter.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def _parameters_form() -> Callable[..., Awaitable[None]]:
    """A dependency that declares every explain parameter as a form field (the schema's)."""

    async def explain_fields(**_: Any) -> None:
        return None

    explain_fields.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_form_field(p) for p in PARAMETERS.values()], return_annotation=None
    )
    return explain_fields


#: The explain parameters as form fields (method, class_idx, ..., num_samples, std, gamma, ...).
explain_fields = _parameters_form()


@cache
def explain_field_schemas() -> dict[str, dict[str, Any]]:
    """The explain fields as the schema of a form body shows them, by name, in order: rendered
    by FastAPI itself, from a route that declares them and is never served."""
    probe = APIRouter()

    @probe.post("/fields")
    async def fields(_: Annotated[None, Depends(explain_fields)] = None) -> None:
        return None

    schemas = get_openapi(title="fields", version="0", routes=probe.routes)["components"]
    (body,) = (s for name, s in schemas["schemas"].items() if name.startswith("Body_"))
    return dict(body["properties"])


def takes_explain_form(route: APIRoute) -> bool:
    """Whether a route reads the explain form (its body's schema lists the explain fields)."""
    return depends_on(route.dependant, explain_form)


def _repeatable(annotation: Any) -> bool:
    """Whether a declared form field takes several parts (``list[UploadFile]``)."""
    return get_origin(annotation) is list or any(_repeatable(a) for a in get_args(annotation))


def _declared_fields(route: APIRoute) -> dict[str, bool]:
    """The form fields a route's signature declares (name -> repeatable)."""
    body = route.body_field.field_info.annotation if route.body_field is not None else None
    fields = getattr(body, "model_fields", {})
    return {field.alias or name: _repeatable(field.annotation) for name, field in fields.items()}


def _own_fields(route: APIRoute) -> dict[str, bool]:
    """The form fields the route reads itself: those it declares, the explain parameters
    aside."""
    return {n: many for n, many in _declared_fields(route).items() if n not in PARAMETERS}


async def _form_parts(request: Request) -> dict[str, list[Any]]:
    """The parts of the form by name, in order (parsed once, by FastAPI, and cached)."""
    parts: dict[str, list[Any]] = {}
    for name, value in (await request.form()).multi_items():
        parts.setdefault(name, []).append(value)
    return parts


async def declared_fields_only(request: Request) -> None:
    """A route dependency: the form holds only the fields the route declares, each once unless
    it repeats (``/predict``'s form, whose fields FastAPI types itself)."""
    declared = _declared_fields(request.scope["route"])
    for name, values in (await _form_parts(request)).items():
        if name not in declared:
            raise unknown_name(name, list(declared), what=("field", "fields"))
        if not declared[name]:
            one_value(name, values)  # FastAPI would take the last of repeated parts


async def explain_values(request: Request) -> dict[str, Any]:
    """The parts of the form that the route does not read itself, as text (a list when a name
    repeats), for ``read_text``; a repeated one-value field of the route's own is refused
    too."""
    own = _own_fields(request.scope["route"])
    values: dict[str, Any] = {}
    for name, texts in (await _form_parts(request)).items():
        if name not in own:
            values[name] = texts if len(texts) > 1 else texts[0]
        elif not own[name]:
            one_value(name, texts)  # FastAPI would take the last of repeated parts
    return values


def _wants_png(request: Request) -> bool:
    """Whether the client prefers the overlay as ``image/png`` to JSON; JSON when it takes
    neither."""
    return prefers(request, "image/png", over="application/json")


def _check_png_answer(params: ExplainParams, images: int) -> None:
    """An ``image/png`` answer holds one overlay: one image, one method, one class or box, and
    no scores."""
    if images != 1:
        raise NotAcceptable(
            "An image/png answer holds one image; send one file or accept application/json."
        )
    methods = (params.method or "").split(",")
    if len({m.strip().lower() for m in methods}) > 1:
        raise NotAcceptable(
            "An image/png answer holds one method's overlay; send one method or accept "
            "application/json."
        )
    several = [
        name
        for name, asks in (
            ("classes", len(params.classes) > 1),
            ("top_classes", (params.top_classes or 1) > 1),
            ("box", len(params.boxes) > 1 or any(b.strip().lower() == "all" for b in params.boxes)),
        )
        if asks
    ]
    if several:
        raise NotAcceptable(
            f"An image/png answer holds one explanation's overlay, and {several[0]} asks for "
            "several; explain one class (or one box=K) or accept application/json.",
            details={"parameter": several[0]},
        )
    if params.faithfulness:
        raise NotAcceptable(
            "An image/png answer holds the overlay alone, and faithfulness asks for scores it "
            "has no room for; leave faithfulness out or accept application/json.",
            details={"parameter": "faithfulness"},
        )


async def explain_form(
    request: Request,
    file: Annotated[
        list[UploadFile],
        File(
            description="one or more images (repeat the part)",
            json_schema_extra={"minItems": 1},
        ),
    ],
    model: Annotated[
        str | None, Form(description="model name; default: the default model", examples=["shapes"])
    ] = None,
    values: Annotated[dict[str, Any], Depends(explain_values)] = None,  # type: ignore[assignment]
) -> ExplainForm:
    """Parse the form into explain parameters; the explainer checks them against the model."""
    as_png = _wants_png(request)
    params = build_params(
        read_text(values),
        fixed=_PNG_ANSWER if as_png else None,
        others=_own_fields(request.scope["route"]),
    )
    if as_png:
        _check_png_answer(params, len(file))
    return ExplainForm(files=file, model=model or None, params=params, as_png=as_png)
