"""The multipart form of an explanation, shared by ``POST /explain`` and ``POST /jobs``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, File, Form, Request, UploadFile

from app.cam import METHODS, MethodOption
from app.errors import InvalidParameter, NotAcceptable
from app.pipeline.explainer import ExplainParams
from app.pipeline.rendering import (
    DEFAULT_ALPHA,
    DEFAULT_COLORMAP,
    DEFAULT_IMAGE_FORMAT,
    MAX_SIDE,
    MIN_SIDE,
    OUTPUT_KINDS,
)


@dataclass(frozen=True)
class ExplainForm:
    """The form, parsed: the file parts, the model's name and the explain parameters."""

    files: list[UploadFile]
    model: str | None
    params: ExplainParams
    as_png: bool
    """The client asked for the overlay itself (``Accept: image/png``), not JSON."""


def _split(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _class_indices(values: list[str] | None) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _split(values))
    except ValueError:
        raise InvalidParameter(
            "class_idx must be integers: one for all images or one per image "
            "(repeat the field or separate by commas)."
        ) from None


def _wants_png(request: Request) -> bool:
    for item in request.headers.get("accept", "").split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/png", "image/*"):
            return True
        if media in ("application/json", "application/*"):
            return False
    return False


def _takers(name: str) -> list[tuple[str, MethodOption]]:
    return [
        (method, option)
        for method, cls in METHODS.items()
        if (option := cls.option(name)) is not None and option.public
    ]


def _option_field(name: str) -> inspect.Parameter:
    """One form field for an option, from every method's declaration of it."""
    takers = _takers(name)
    first = takers[0][1]
    lows = [o.low for _, o in takers if o.low is not None]
    highs = [o.high for _, o in takers if o.high is not None]
    taken_by = ", ".join(
        method + ("" if option.default is None else f" ({option.default})")
        for method, option in takers
    )
    description = f"{first.help}; taken by {taken_by}"
    if first.type is list:
        annotation: Any = Annotated[
            list[str] | None,
            Form(description=description + " (ints, repeat or comma list)", examples=[["3"]]),
        ]
    else:
        annotation = Annotated[
            first.type | None,
            Form(
                description=description,
                ge=min(lows) if lows else None,
                le=max(highs) if highs else None,
            ),
        ]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def _options_form() -> Callable[..., dict[str, Any]]:
    """A dependency whose form fields are the public options every method declares."""
    names = list(dict.fromkeys(o.name for cls in METHODS.values() for o in cls.options if o.public))
    lists = {n for n in names if _takers(n)[0][1].type is list}

    def method_options(**values: Any) -> dict[str, Any]:
        options = {}
        for name, value in values.items():
            if value is None:
                continue
            if name in lists:
                try:
                    value = tuple(int(v) for v in _split(value))
                except ValueError:
                    raise InvalidParameter(f"{name} must be integers.") from None
            options[name] = value
        return options

    method_options.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_option_field(name) for name in names], return_annotation=dict[str, Any]
    )
    return method_options


#: The methods' options as form fields (num_samples, std, batch_size, seed, gamma, ...).
method_options = _options_form()


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
    method: Annotated[
        list[str] | None,
        Form(
            description="CAM method, case-insensitive; default: the model's. Several (repeat "
            "the field or separate by commas) give one explanation per method",
            examples=[["GradCAM"]],
        ),
    ] = None,
    class_idx: Annotated[
        list[str] | None,
        Form(
            description="class to explain: one for all images or one per image; default top-1",
            examples=[["3"]],
        ),
    ] = None,
    top_k: Annotated[int, Form(ge=1, le=1000, description="predictions returned per image")] = 5,
    target_layer: Annotated[
        list[str] | None,
        Form(
            description="layer(s) to explain (repeatable); several add a fused map",
            examples=[["layer3"]],
        ),
    ] = None,
    output: Annotated[
        list[str] | None,
        Form(
            description=f"any of {', '.join(OUTPUT_KINDS)} (repeat or comma list)",
            examples=[["overlay", "raw"]],
        ),
    ] = None,
    colormap: Annotated[
        str, Form(description="jet, viridis, inferno, turbo, hot, ...")
    ] = DEFAULT_COLORMAP,
    alpha: Annotated[
        float, Form(ge=0, le=1, description="weight of the image in overlays")
    ] = DEFAULT_ALPHA,
    image_format: Annotated[
        Literal["png", "jpeg", "webp"],
        Form(description="encoding of overlays and heatmaps; png is lossless"),
    ] = DEFAULT_IMAGE_FORMAT,
    size: Annotated[
        str | None,
        Form(
            description="size of overlays and heatmaps: 'original', 'input' (the model's crop) "
            f"or a longest side in pixels ({MIN_SIDE}-{MAX_SIDE}); default: the upload's size, "
            "scaled down to CAMSERVE_MAX_OUTPUT_SIDE",
            examples=["512"],
        ),
    ] = None,
    normalized: Annotated[bool, Form(description="raw maps min-max scaled to [0, 1]")] = True,
    options: Annotated[dict[str, Any], Depends(method_options)] = None,  # type: ignore[assignment]
) -> ExplainForm:
    """Parse and type-check the form; the explainer checks it against the model."""
    as_png = _wants_png(request)
    if as_png and len(file) != 1:
        raise NotAcceptable(
            "An image/png answer holds one image; send one file or accept application/json."
        )
    methods = _split(method)
    if as_png and len({m.lower() for m in methods}) > 1:
        raise NotAcceptable(
            "An image/png answer holds one method's overlay; send one method or accept "
            "application/json."
        )
    params = ExplainParams(
        method=",".join(methods) or None,
        class_idx=_class_indices(class_idx),
        top_k=top_k,
        target_layers=tuple(_split(target_layer)),
        outputs=("overlay",) if as_png else tuple(o.lower() for o in _split(output) or ["overlay"]),
        colormap=colormap.strip().lower(),
        alpha=alpha,
        image_format="png" if as_png else image_format,
        normalized=normalized,
        size=size,
        options=options,
    )
    return ExplainForm(files=file, model=model or None, params=params, as_png=as_png)
