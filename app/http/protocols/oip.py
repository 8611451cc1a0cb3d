"""Open Inference Protocol (KServe v2): health, metadata and ``infer`` returning the logits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app import __version__
from app.errors import clip
from app.http.deps import get_explainer, get_registry, get_settings, require_api_key, within_limits
from app.http.protocols.base import (
    ERROR_RESPONSES,
    EXAMPLE_IMAGE_B64,
    BadProtocolRequest,
    ProtocolRoute,
    decode_images,
)
from app.models.registry import ModelRegistry
from app.pipeline.explainer import Explainer
from app.settings import Settings

INPUT = "image"
OUTPUT = "logits"
PLATFORM = "pytorch"
MAX_RANK = 8
"""Most dimensions of an input's shape (images need two: the batch, and rows of it)."""
MAX_ELEMENTS = 256
"""Most elements of an input's data (CAMSERVE_MAX_IMAGES allows at most 256 images)."""
MAX_ID = 256
"""Longest request ``id``: it is echoed in the answer."""

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=ProtocolRoute)
guarded = [Depends(require_api_key)]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "shapes",
                    "versions": ["1"],
                    "platform": PLATFORM,
                    "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
                    "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, 8]}],
                }
            ]
        }
    )
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=-1)]] = Field(
        max_length=MAX_RANK, description="at most one -1 (the batch size, from the data)"
    )
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(max_length=MAX_ELEMENTS, description="flat, or one list per row")

    @field_validator("shape")
    @classmethod
    def _one_wildcard(cls, shape: list[int]) -> list[int]:
        if shape.count(-1) > 1:
            raise ValueError(f"at most one dimension may be -1; got {shape}")
        return shape

    @field_validator("data")
    @classmethod
    def _short_rows(cls, data: list[Any]) -> list[Any]:
        if any(isinstance(row, list) and len(row) > MAX_ELEMENTS for row in data):
            raise ValueError(f"a row of data may hold at most {MAX_ELEMENTS} elements")
        return data


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {
                            "name": INPUT,
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": [EXAMPLE_IMAGE_B64],
                        }
                    ],
                    "outputs": [{"name": OUTPUT}],
                }
            ]
        }
    )
    id: str | None = Field(None, max_length=MAX_ID)
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=MAX_ELEMENTS)
    outputs: list[RequestOutput] | None = Field(None, max_length=MAX_ELEMENTS)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"]
    data: list[float] = Field(description="row-major")


class InferenceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "shapes",
                    "id": "42",
                    "outputs": [
                        {
                            "name": OUTPUT,
                            "shape": [1, 3],
                            "datatype": "FP32",
                            "data": [4.79, 0.06, -0.1],
                        }
                    ],
                }
            ]
        }
    )
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


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
    ready = registry.ready and not request.app.state.lifecycle.draining
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("", response_model=ServerMetadata)
def get_server_metadata() -> ServerMetadata:
    """Name and version of the server."""
    return ServerMetadata(name="camserve", version=__version__, extensions=[])


@router.get(
    "/models/{name}",
    response_model=ModelMetadata,
    dependencies=guarded,
    responses=ERROR_RESPONSES,
)
def get_model_metadata(name: str, registry: ModelRegistry = Depends(get_registry)) -> ModelMetadata:
    """The model's input (base64 images) and output (logits, one row per image)."""
    model = registry.get(name)
    return ModelMetadata(
        name=model.spec.name,
        versions=["1"],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, model.spec.num_classes])],
    )


@router.get(
    "/models/{name}/ready",
    dependencies=guarded,
    responses={**ERROR_RESPONSES, 503: {"description": "the model is loading or failed"}},
)
def get_model_ready(name: str, registry: ModelRegistry = Depends(get_registry)) -> JSONResponse:
    """Answer 200 when the model can serve, 503 while it loads or when it failed."""
    entry = registry.entry(name)
    ready = entry.status == "ready"
    return JSONResponse({"name": entry.name, "ready": ready}, status_code=200 if ready else 503)


def _fits(shape: list[int], elements: int) -> bool:
    """Whether ``elements`` fill ``shape``, whose one -1 (if any) takes what the others leave."""
    if not shape:
        return False
    known = 1
    for dim in shape:
        known *= dim if dim >= 0 else 1
    if -1 in shape:
        return known > 0 and elements % known == 0
    return known == elements


def _images(body: InferenceRequest) -> list[tuple[str, str]]:
    """The base64 images of the ``image`` input, checked against its shape and datatype."""
    names = [tensor.name for tensor in body.inputs]
    if names != [INPUT]:
        raise BadProtocolRequest(
            f"Expected one input named {INPUT!r} (BYTES, base64-encoded images); got "
            f"{', '.join(clip(n) for n in names[:5])}{' ...' if len(names) > 5 else ''}."
        )
    tensor = body.inputs[0]
    if tensor.datatype != "BYTES":
        raise BadProtocolRequest(
            f"Input {INPUT!r} must have datatype BYTES (base64-encoded images); "
            f"got {clip(tensor.datatype)}."
        )
    # Row-major data may come flat or nested one level per row.
    flat = [part for item in tensor.data for part in (item if isinstance(item, list) else [item])]
    if not all(isinstance(item, str) for item in flat):
        raise BadProtocolRequest(
            f"Input {INPUT!r} must hold base64 strings, one image per batch row."
        )
    if not _fits(tensor.shape, len(flat)):
        raise BadProtocolRequest(
            f"Input {INPUT!r} has shape {tensor.shape} but {len(flat)} element(s); use shape "
            f"[{len(flat)}] for {len(flat)} image(s)."
        )
    for output in body.outputs or []:
        if output.name != OUTPUT:
            raise BadProtocolRequest(
                f"Unknown output {clip(output.name)}; this model has {OUTPUT!r}."
            )
    return [(f"image{i}", text) for i, text in enumerate(flat)]


@router.post(
    "/models/{name}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    dependencies=guarded,
    responses=ERROR_RESPONSES,
)
async def infer_model(
    name: str,
    body: InferenceRequest,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> InferenceResponse:
    """Logits for base64-encoded images, through the same batched forward as /predict."""
    classes = registry.get(name).spec.num_classes
    uploads = decode_images(_images(body), settings)
    answer = await within_limits(request, explainer.predict(name, uploads, top_k=classes))
    data: list[float] = []
    for result in answer.results:
        row = [0.0] * classes
        for prediction in result.predictions:
            row[prediction.class_idx] = prediction.logit
        data.extend(row)
    return InferenceResponse(
        model_name=answer.model,
        model_version="1",
        id=body.id,
        outputs=[
            ResponseOutput(
                name=OUTPUT, shape=[len(answer.results), classes], datatype="FP32", data=data
            )
        ],
    )
