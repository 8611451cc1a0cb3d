"""Class activation maps for uploaded images."""

from __future__ import annotations

import base64
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.http.answers import json_answer
from app.http.deps import (
    get_explainer,
    get_settings,
    job_owner,
    read_uploads,
    require_api_key,
    within_limits,
)
from app.http.routes import VersionField, error_responses
from app.http.routes.forms import ExplainForm, explain_form
from app.pipeline.cache import CACHE_HEADER
from app.pipeline.explainer import Explainer
from app.pipeline.results import ExplainResponse
from app.settings import Settings

router = APIRouter(tags=["explanation"], dependencies=[Depends(require_api_key)])


@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "JSON, or with `Accept: image/png` and one image the overlay itself",
            "headers": {
                CACHE_HEADER: {
                    "description": "hit, miss, bypass or off: as `timings.cache`",
                    "schema": {"type": "string"},
                }
            },
        },
        **error_responses(400, 401, 404, 406, 413, 415, 422, 499, 500, 503, 504),
    },
)
async def explain_images(
    request: Request,
    form: ExplainForm = Depends(explain_form),
    version: VersionField = None,
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> ExplainResponse | Response:
    """Predict and explain the uploaded images with a class activation map method."""
    uploads = await read_uploads(form.files, settings)
    answer = await within_limits(
        request,
        explainer.explain(
            form.model, uploads, form.params, version=version, scope=job_owner(request)
        ),
    )
    if form.as_png:
        # MapOutput's fields are made from OUTPUT_KINDS at runtime; a checker cannot see them.
        last = answer.results[0].explanations[0].maps[-1]
        overlay = last.model_dump(include={"overlay"})["overlay"] or ""
        return Response(
            base64.b64decode(overlay),
            media_type="image/png",
            headers={
                "X-Camserve-Method": answer.method,
                "X-Camserve-Class": str(answer.results[0].explanations[0].class_idx),
                # Percent-encoded: header values must be latin-1, labels need not be.
                "X-Camserve-Label": quote(answer.results[0].explanations[0].label),
                CACHE_HEADER: answer.timings.cache,
                "Vary": "Accept",
            },
        )
    # The answer's kind follows Accept (JSON, or the overlay itself): a cache must key on it.
    return await json_answer(answer, headers={CACHE_HEADER: answer.timings.cache, "Vary": "Accept"})
