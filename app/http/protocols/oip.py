"""Open Inference Protocol (KServe v2): health, metadata and ``infer`` returning the logits and,
when the output ``cam`` is asked for, each image's class activation map.

An explanation's parameters (``method``, ``class_idx``, ``target_layer``, ``normalized`` and
every method option) come in the request's ``parameters`` and go to ``build_params`` as sent."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app import __version__
from app.errors import BadRequest, clip
from app.http.deps import get_explainer, get_registry, get_settings, require_api_key, within_limits
from app.http.protocols.base import (
    ERROR_RESPONSES,
    EXAMPLE_IMAGE_B64,
    ProtocolRoute,
    decode_images,
    get_model_ready,
)
from app.models.registry import ModelRegistry
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.params import OPTION_NAMES, build_params
from app.pipeline.results import ExplainResponse, Prediction
from app.settings import Settings

INPUT = "image"
OUTPUT = "logits"
CAM = "cam"
OUTPUTS = (OUTPUT, CAM)
#: The general explain parameters ``infer`` takes; the map is always raw (``output`` fixed).
EXPLAIN_PARAMETERS = ("method", "class_idx", "target_layer", "normalized")
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
    parameters: dict[str, Any] | None = None
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
    return _metadata(registry, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    dependencies=guarded,
    responses=ERROR_RESPONSES,
)
def get_model_version_metadata(
    name: str, version: int, registry: ModelRegistry = Depends(get_registry)
) -> ModelMetadata:
    """One version's input (base64 images) and output (logits, one row per image)."""
    return _metadata(registry, name, version)


def _metadata(registry: ModelRegistry, name: str, version: int | None) -> ModelMetadata:
    model = registry.get(name, version)
    return ModelMetadata(
        name=model.spec.name,
        versions=[str(number) for number in sorted(registry.entry(name).versions)],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, model.spec.num_classes]),
            TensorMetadata(name=CAM, datatype="FP32", shape=[-1, -1, -1]),
        ],
    )


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
    entry = registry.entry(name)
    chosen = entry.versions.get(version)
    ready = chosen is not None and chosen.model is not None
    return JSONResponse(
        {"name": entry.name, "version": str(version), "ready": ready},
        status_code=200 if ready else 503,
    )


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
        raise BadRequest(
            f"Expected one input named {INPUT!r} (BYTES, base64-encoded images); got "
            f"{', '.join(clip(n) for n in names[:5])}{' ...' if len(names) > 5 else ''}."
        )
    tensor = body.inputs[0]
    if tensor.datatype != "BYTES":
        raise BadRequest(
            f"Input {INPUT!r} must have datatype BYTES (base64-encoded images); "
            f"got {clip(tensor.datatype)}."
        )
    # Row-major data may come flat or nested one level per row.
    flat = [part for item in tensor.data for part in (item if isinstance(item, list) else [item])]
    if not all(isinstance(item, str) for item in flat):
        raise BadRequest(f"Input {INPUT!r} must hold base64 strings, one image per batch row.")
    if not _fits(tensor.shape, len(flat)):
        raise BadRequest(
            f"Input {INPUT!r} has shape {tensor.shape} but {len(flat)} element(s); use shape "
            f"[{len(flat)}] for {len(flat)} image(s)."
        )
    for output in body.outputs or []:
        if output.name not in OUTPUTS:
            raise BadRequest(
                f"Unknown output {clip(output.name)}; this model has {' and '.join(OUTPUTS)}."
            )
    return [(f"image{i}", text) for i, text in enumerate(flat)]


def _explain_params(body: InferenceRequest) -> ExplainParams | None:
    """The explanation the request asks for (output ``cam``), from its ``parameters``; None
    when it asks for the logits only (explain parameters are then refused, not ignored)."""
    parameters = body.parameters or {}
    if CAM not in {output.name for output in body.outputs or []}:
        explaining = [name for name in parameters if name in (*EXPLAIN_PARAMETERS, *OPTION_NAMES)]
        if explaining:
            raise BadRequest(
                f"Parameter {explaining[0]!r} is for an explanation; add the output {CAM!r} "
                "to the request's outputs."
            )
        return None
    params = build_params(parameters, accepted=EXPLAIN_PARAMETERS, fixed={"output": "raw"})
    if params.method is not None and "," in params.method:
        raise BadRequest(f"The output {CAM!r} holds one map per image; send one method.")
    return params


def _logits(rows: list[list[float]]) -> ResponseOutput:
    return ResponseOutput(
        name=OUTPUT,
        shape=[len(rows), len(rows[0]) if rows else 0],
        datatype="FP32",
        data=[value for row in rows for value in row],
    )


def _cams(answer: ExplainResponse) -> ResponseOutput:
    """Each image's map (the fused one when there are several layers), stacked, with what
    made it as the output's parameters."""
    maps = [result.explanations[0].maps[-1] for result in answer.results]
    raws = [m.model_dump(include={"raw"})["raw"] for m in maps]
    options = {
        name: ",".join(map(str, value)) if isinstance(value, list | tuple) else value
        for name, value in answer.options.items()
    }
    return ResponseOutput(
        name=CAM,
        shape=[len(raws), *raws[0]["shape"]],
        datatype="FP32",
        parameters={
            "method": answer.method,
            "layer": maps[0].layer,
            "target_layers": ",".join(answer.target_layers),
            "class_idx": ",".join(str(r.explanations[0].class_idx) for r in answer.results),
            "normalized": raws[0]["normalized"],
            **options,
        },
        data=[value for raw in raws for row in raw["values"] for value in row],
    )


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
    """Logits for base64-encoded images, through the same batched forward as /predict; with
    the output `cam`, their class activation maps too (explain parameters in `parameters`)."""
    return await _infer(request, name, None, body, registry, explainer, settings)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    dependencies=guarded,
    responses=ERROR_RESPONSES,
)
async def infer_model_version(
    name: str,
    version: int,
    body: InferenceRequest,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    explainer: Explainer = Depends(get_explainer),
    settings: Settings = Depends(get_settings),
) -> InferenceResponse:
    """The same as `/v2/models/{name}/infer`, on this version of the model."""
    return await _infer(request, name, version, body, registry, explainer, settings)


async def _infer(
    request: Request,
    name: str,
    version: int | None,
    body: InferenceRequest,
    registry: ModelRegistry,
    explainer: Explainer,
    settings: Settings,
) -> InferenceResponse:
    uploads = decode_images(_images(body), settings)
    params = _explain_params(body)
    outputs: dict[str, ResponseOutput] = {}
    if params is None:
        classes = registry.get(name, version).spec.num_classes
        answer = await within_limits(
            request, explainer.predict(name, uploads, top_k=classes, version=version)
        )
        model_name, served = answer.model, answer.version
        outputs[OUTPUT] = _logits([_row(r.predictions, classes) for r in answer.results])
    else:
        explained = await within_limits(
            request, explainer.explain(name, uploads, params, version=version)
        )
        model_name, served = explained.model, explained.version
        outputs[OUTPUT] = _logits([result.logits for result in explained.results])
        outputs[CAM] = _cams(explained)
    wanted = [output.name for output in body.outputs or []] or [OUTPUT]
    return InferenceResponse(
        model_name=model_name,
        model_version=str(served),
        id=body.id,
        outputs=[outputs[name] for name in dict.fromkeys(wanted)],
    )


def _row(predictions: list[Prediction], classes: int) -> list[float]:
    row = [0.0] * classes
    for prediction in predictions:
        row[prediction.class_idx] = prediction.logit
    return row
