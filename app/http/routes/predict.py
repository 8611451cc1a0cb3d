"""Classification without explanation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from app.http.deps import get_explainer, get_settings, read_uploads, require_api_key, within_limits
from app.http.routes import VersionField, error_responses
from app.http.routes.forms import declared_fields_only
from app.pipeline.explainer import Explainer
from app.pipeline.results import PredictResponse
from app.settings import Settings

router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 404, 413, 415, 422, 499, 500, 503, 504),
    dependencies=[Depends(declared_fields_only)],
)
async def predict_images(
    request: Request,
    file: Annotated[
        list[UploadFile],
        File(
            description="one or more images (repeat the part)",
            json_schema_extra={"minItems": 1},
        ),
    ],
    model: Annotated[str | None, Form(description="model name; default: the default model")] = None,
    top_k: Annotated[int, Form(ge=1, le=1000, description="classes returned per image")] = 5,
    version: VersionField = None,
    output: Annotated[
        list[str] | None,
        Form(description="segmentation models: mask adds the label mask as a PNG"),
    ] = None,
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> PredictResponse:
    """Classify the uploaded images with one batched forward: top-k labels per image (a
    detector's boxes, a segmenter's classes)."""
    uploads = await read_uploads(file, settings)
    outputs = tuple(
        dict.fromkeys(p.strip().lower() for o in output or () for p in o.split(",") if p.strip())
    )
    return await within_limits(
        request, explainer.predict(model or None, uploads, top_k, version, outputs=outputs)
    )
