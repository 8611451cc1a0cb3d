"""A job's work, whichever store holds it: run it to an outcome, carry its input as bytes, and
bound the size of its result."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from PIL import Image

from app.cam import ProgressCallback
from app.errors import CamserveError, ResultTooLarge, error_body
from app.observability.context import start_request
from app.pipeline.classes import class_count
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.fairness import current_caller
from app.pipeline.rendering import (
    ANSWER_BYTES_PER_PIXEL,
    OUTPUT_KINDS,
    PictureSize,
    draws_pictures,
)
from app.pipeline.results import ErrorDetail, ExplainResponse, JobStatus

logger = logging.getLogger(__name__)

#: Characters of one float of a raw map in JSON ("0.123456789012345, ").
_RAW_BYTES_PER_VALUE = 22
_RESULT_OVERHEAD = 4096  # predictions, logits, timings, names


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    result: ExplainResponse | None = None
    error: ErrorDetail | None = None


async def run_job(
    explainer: Explainer,
    model: str | None,
    uploads: Sequence[Upload],
    params: ExplainParams,
    progress: ProgressCallback,
    job_id: str,
    model_version: int | None = None,
    scope: str | None = None,
    *,
    client: str = "",
) -> Outcome:
    """Run the explanation without admission (a job waits for its slot instead of being
    refused), in the background priority class: interactive requests on its model go first, at
    its pauses and chunk boundaries (``app.pipeline.scheduling``). A cancellation propagates:
    the caller knows why it cancelled. ``scope``: whose cached explanations it may use and
    fill, its key's as on /explain (None: everyone's). ``client``: who created the job, for the
    turns that are fair among clients; its work runs as that client's (the request that created
    it is gone, or ran on another replica)."""
    if client and current_caller() != client:  # this task's own context: a worker's
        start_request(job_id).caller = client
    try:
        result = await explainer.explain(
            model,
            uploads,
            params,
            progress=progress,
            admit=False,
            version=model_version,
            priority="background",
            job=True,
            scope=scope,
        )
    except asyncio.CancelledError:
        raise
    except CamserveError as error:
        detail = error_body(error.code, error.message, error.details)["error"]
        return Outcome("failed", error=ErrorDetail(**detail))
    except Exception:
        logger.exception("job %s failed", job_id[:8])
        return Outcome(
            "failed",
            error=ErrorDetail(
                code=CamserveError.code,
                message="Internal server error; the details are in the log.",
            ),
        )
    return Outcome("succeeded", result=result)


_TUPLE_FIELDS = {f.name for f in fields(ExplainParams) if str(f.type).startswith("tuple")}


def result_over(outcome: Outcome, limit: int) -> Outcome:
    """``outcome``, or a failed one with ``result_too_large`` when its result's JSON is over
    ``limit`` bytes (the estimate at creation is an upper bound; this is the proof)."""
    if outcome.result is None or len(outcome.result.model_dump_json()) <= limit:
        return outcome
    return Outcome(
        "failed",
        error=ErrorDetail(
            code=ResultTooLarge.code,
            message=f"The result came to more than the {limit / 1e6:.1f} MB a job may keep "
            "(CAMSERVE_JOB_MAX_RESULT_BYTES); ask for fewer images, outputs or a smaller size.",
        ),
    )


def params_to_json(params: ExplainParams) -> str:
    return json.dumps(asdict(params))


def params_from_json(text: str | bytes) -> ExplainParams:
    raw: dict[str, Any] = json.loads(text)
    values: dict[str, Any] = {
        k: tuple(v) if k in _TUPLE_FIELDS and v is not None else v for k, v in raw.items()
    }
    return ExplainParams(**values)


def check_result_size(
    explainer: Explainer,
    model: str | None,
    uploads: Sequence[Upload],
    params: ExplainParams,
    limit: int,
    model_version: int | None = None,
) -> None:
    """ResultTooLarge when the result could exceed ``limit`` bytes. Counted from the image
    headers (no pixel decoded): pictures at the size they will be drawn, raw maps at the
    layers' resolution; an upload whose header cannot be read counts nothing (the job fails
    when it decodes it)."""
    estimate = estimate_result_bytes(explainer, model, uploads, params, model_version)
    if estimate <= limit:
        return
    raise ResultTooLarge(
        f"The result of this job could reach {estimate / 1e6:.1f} MB, more than the "
        f"{limit / 1e6:.1f} MB a job may keep (CAMSERVE_JOB_MAX_RESULT_BYTES). Ask for fewer "
        "images, outputs or methods, a smaller size, or image_format=jpeg; or run it with "
        "POST /explain.",
        details={"estimate_bytes": estimate, "limit_bytes": limit},
    )


def estimate_result_bytes(
    explainer: Explainer,
    model_name: str | None,
    uploads: Sequence[Upload],
    params: ExplainParams,
    model_version: int | None = None,
) -> int:
    model = explainer.registry.get(model_name, model_version)
    methods = len(params.method.split(",")) if params.method else 1
    methods *= class_count(params)  # one explanation per method and class
    layers = params.target_layers or model.target_layers
    maps = len(layers) + (1 if len(layers) > 1 else 0)
    pictures = sum(1 for kind in params.outputs if OUTPUT_KINDS[kind].picture)
    raw = "raw" in params.outputs
    size = PictureSize.parse(params.size, explainer.max_output_side)
    per_pixel = ANSWER_BYTES_PER_PIXEL.get(params.image_format, 4.0)
    map_values = max((_area(model.layer_shapes.get(name, ())) for name in layers), default=0)
    total = _RESULT_OVERHEAD
    for upload in uploads:
        area = _picture_area(upload, size, model.spec.crop) if draws_pictures(params.outputs) else 0
        per_map = pictures * area * per_pixel + (map_values * _RAW_BYTES_PER_VALUE if raw else 0)
        total += int(methods * maps * per_map) + _RESULT_OVERHEAD
    return total


def _area(shape: tuple[int, ...]) -> int:
    return shape[-1] * shape[-2] if len(shape) >= 2 else 0


def _picture_area(upload: Upload, size: PictureSize, crop: tuple[int, int]) -> int:
    try:
        with Image.open(io.BytesIO(upload.data)) as image:
            original = image.size
    except Exception:  # the decoder says what is wrong when the job runs
        return 0
    width, height = size.canvas_size(original, crop)
    return width * height
