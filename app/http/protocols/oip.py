"""Open Inference Protocol (KServe v2) over HTTP: health, metadata and ``infer`` (the codec is
``app.protocols.oip``), with the binary tensor data extension both ways."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app.http.cutoff import PROTOCOL_ADVICE
from app.http.deps import (
    get_explainer,
    get_registry,
    get_settings,
    job_owner,
    require_api_key,
    within_limits,
)
from app.http.protocols.base import ERROR_RESPONSES, ProtocolRoute, get_model_ready
from app.models.registry import ModelRegistry
from app.pipeline.explainer import Explainer
from app.protocols.binary import HEADER, split_buffers
from app.protocols.oip import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
    answer_text,
    model_metadata,
    model_ready,
    read_inference,
    run_inference,
    server_metadata,
    server_ready,
)
from app.protocols.triton import model_config, statistics
from app.settings import Settings

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=ProtocolRoute)
guarded = [Depends(require_api_key)]


@router.get("/health/live")
def get_live() -> dict[str, bool]:
    """Answer 200 while the process is alive."""
    return {"live": True}


@router.get(
    "/health/ready",
    responses={503: {"description": "models are still loading, or the service drains"}},
)
def get_server_ready(
    request: Request, registry: ModelRegistry = Depends(get_registry)
) -> JSONResponse:
    """Answer 200 once every model has loaded (or failed); 503 before, and once draining."""
    ready = server_ready(registry, request.app.state.lifecycle.draining)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("", response_model=ServerMetadata)
def get_server_metadata() -> ServerMetadata:
    """Name and version of the server, and the protocol extensions it serves."""
    return server_metadata()


@router.get("/models/stats", dependencies=guarded, responses=ERROR_RESPONSES)
def get_all_statistics(
    request: Request, registry: ModelRegistry = Depends(get_registry)
) -> dict[str, Any]:
    """Every model's statistics, in Triton's shape (from camserve's metrics)."""
    return statistics(request.app.state.metrics, registry, None, None)


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    dependencies=guarded,
    responses=ERROR_RESPONSES,
)
def get_model_metadata(name: str, registry: ModelRegistry = Depends(get_registry)) -> ModelMetadata:
    """The model's input (encoded images) and outputs (logits, one row per image; cam)."""
    return model_metadata(registry, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    dependencies=guarded,
    responses=ERROR_RESPONSES,
)
def get_model_version_metadata(
    name: str, version: int, registry: ModelRegistry = Depends(get_registry)
) -> ModelMetadata:
    """One version's input (encoded images) and outputs (logits, one row per image; cam)."""
    return model_metadata(registry, name, version)


@router.get("/models/{name}/config", dependencies=guarded, responses=ERROR_RESPONSES)
def get_model_config(
    name: str,
    registry: ModelRegistry = Depends(get_registry),
    settings: Settings = Depends(get_settings),
) -> dict[str, Any]:
    """The model's configuration in Triton's shape: its tensors, batching and methods."""
    return model_config(registry.get(name), settings)


@router.get(
    "/models/{name}/versions/{version}/config", dependencies=guarded, responses=ERROR_RESPONSES
)
def get_model_version_config(
    name: str,
    version: int,
    registry: ModelRegistry = Depends(get_registry),
    settings: Settings = Depends(get_settings),
) -> dict[str, Any]:
    """One version's configuration in Triton's shape."""
    return model_config(registry.get(name, version), settings)


@router.get("/models/{name}/stats", dependencies=guarded, responses=ERROR_RESPONSES)
def get_model_statistics(
    name: str, request: Request, registry: ModelRegistry = Depends(get_registry)
) -> dict[str, Any]:
    """The model's statistics in Triton's shape: requests, images, passes and time per phase."""
    return statistics(request.app.state.metrics, registry, name, None)


@router.get(
    "/models/{name}/versions/{version}/stats", dependencies=guarded, responses=ERROR_RESPONSES
)
def get_model_version_statistics(
    name: str, version: int, request: Request, registry: ModelRegistry = Depends(get_registry)
) -> dict[str, Any]:
    """One version's statistics in Triton's shape."""
    return statistics(request.app.state.metrics, registry, name, version)


router.add_api_route(
    "/models/{name}/ready",
    get_model_ready,
    methods=["GET"],
    dependencies=guarded,
    responses={**ERROR_RESPONSES, 503: {"description": "the model is loading or failed"}},
)


@router.get(
    "/models/{name}/versions/{version}/ready",
    dependencies=guarded,
    responses={**ERROR_RESPONSES, 503: {"description": "the version is loading or failed"}},
)
def get_model_version_ready(
    name: str, version: int, registry: ModelRegistry = Depends(get_registry)
) -> JSONResponse:
    """Answer 200 when this version can serve, 503 while it loads or when it failed."""
    ready = model_ready(registry, name, version)
    return JSONResponse(
        {"name": registry.entry(name).name, "version": str(version), "ready": ready},
        status_code=200 if ready else 503,
    )


INFER_RESPONSES = {
    **ERROR_RESPONSES,
    200: {
        "description": "JSON; with outputs asked for as binary data, that JSON (its length in "
        f"the {HEADER} header) followed by their bytes",
    },
}


@router.post(
    "/models/{name}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    dependencies=guarded,
    responses=INFER_RESPONSES,
)
async def infer_model(
    name: str,
    body: InferenceRequest,
    request: Request,
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> Response:
    """Logits for encoded images (base64 in JSON, or raw in binary data), through the same
    batched forward as /predict; with the output `cam`, their class activation maps too
    (explain parameters in `parameters`, or in the output's `parameters`)."""
    return await _infer(request, name, None, body, explainer, settings)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    dependencies=guarded,
    responses=INFER_RESPONSES,
)
async def infer_model_version(
    name: str,
    version: int,
    body: InferenceRequest,
    request: Request,
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> Response:
    """The same as `/v2/models/{name}/infer`, on this version of the model."""
    return await _infer(request, name, version, body, explainer, settings)


async def _infer(
    request: Request,
    name: str,
    version: int | None,
    body: InferenceRequest,
    explainer: Explainer,
    settings: Settings,
) -> Response:
    explainer.registry.get(name, version)  # an unknown model is named before any image
    binary: bytes | memoryview = getattr(request.state, "binary", b"")
    buffers = (
        split_buffers([tensor.parameters for tensor in body.inputs], binary)
        if request.headers.get(HEADER) is not None
        else None
    )
    # Off the event loop: base64 text of CAMSERVE_MAX_IMAGES images takes over a second to
    # decode and UINT8 pixels become BMPs; on the loop, every other request (probes included)
    # would wait for it.
    inference = await anyio.to_thread.run_sync(read_inference, body, buffers, settings)
    result = await within_limits(
        request,
        run_inference(explainer, name, version, inference, job_owner(request)),
        inference.timeout_s,
        advice=PROTOCOL_ADVICE,
    )
    # Off the event loop too: a segmenter's mask in JSON is a number per pixel (seconds).
    text, tail = await anyio.to_thread.run_sync(answer_text, result)
    if not tail:
        return Response(text, media_type="application/json")
    return Response(
        b"".join((text, *tail)),
        media_type="application/octet-stream",
        headers={HEADER: str(len(text))},
    )
