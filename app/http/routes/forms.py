"""The multipart form of an explanation, shared by ``POST /explain`` and ``POST /jobs``.

Its fields are ``app.pipeline.params.PARAMETERS`` (the general ones and every method's options),
read as the form sends them and handed to ``build_params`` like every other protocol's."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, File, Form, Request, UploadFile

from app.errors import NotAcceptable
from app.pipeline.explainer import ExplainParams
from app.pipeline.params import PARAMETERS, ExplainParameter, build_params

#: What a form part holds for each kind of parameter (repeated fields come as lists).
_FORM_TYPES: dict[str, Any] = {
    "str": str,
    "strs": list[str],
    "int": int,
    "ints": list[str],
    "float": float,
    "bool": bool,
    "size": str,
}
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
    """One form field for a parameter; its bounds are documented here and checked by
    ``build_params`` or the explainer, so that every protocol refuses with one message."""
    repeated = parameter.kind in ("strs", "ints")
    default = None if repeated or parameter.option else parameter.default
    description = parameter.help + (
        " (ints, repeat or comma list)" if parameter.option and repeated else ""
    )
    # Subscripted at runtime: the type is chosen by the parameter's kind, which a checker
    # cannot follow inside ``Annotated[...]``.
    annotation = Annotated.__class_getitem__(  # type: ignore[attr-defined]
        (
            _FORM_TYPES[parameter.kind] | None,
            Form(description=description, json_schema_extra=parameter.hints() or None),
        )
    )
    return inspect.Parameter(
        parameter.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _parameters_form() -> Callable[..., dict[str, Any]]:
    """A dependency whose form fields are every explain parameter; it returns the raw values."""

    def explain_values(**values: Any) -> dict[str, Any]:
        return values

    explain_values.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_form_field(p) for p in PARAMETERS.values()], return_annotation=dict[str, Any]
    )
    return explain_values


#: The explain parameters as form fields (method, class_idx, ..., num_samples, std, gamma, ...).
explain_values = _parameters_form()


def _wants_png(request: Request) -> bool:
    for item in request.headers.get("accept", "").split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/png", "image/*"):
            return True
        if media in ("application/json", "application/*"):
            return False
    return False


def _check_png_answer(params: ExplainParams, images: int) -> None:
    """An ``image/png`` answer holds one overlay: one image, one method."""
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
    params = build_params(values, fixed=_PNG_ANSWER if as_png else None)
    if as_png:
        _check_png_answer(params, len(file))
    return ExplainForm(files=file, model=model or None, params=params, as_png=as_png)
