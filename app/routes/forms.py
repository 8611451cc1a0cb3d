"""The multipart form of an explanation, shared by ``POST /explain`` and ``POST /jobs``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import File, Form, Request, UploadFile

from app.errors import InvalidParameter, NotAcceptable
from app.explainer import ExplainParams
from app.rendering import (
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
    num_samples: Annotated[int | None, Form(ge=1, le=64, description="noise samples")] = None,
    std: Annotated[float | None, Form(ge=0, le=10, description="noise standard deviation")] = None,
    batch_size: Annotated[int | None, Form(ge=1, le=256, description="masks per forward")] = None,
    seed: Annotated[int | None, Form(ge=0, le=2**32 - 1, description="noise seed")] = None,
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
    options = {
        name: value
        for name, value in {
            "num_samples": num_samples,
            "std": std,
            "batch_size": batch_size,
            "seed": seed,
        }.items()
        if value is not None
    }
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
