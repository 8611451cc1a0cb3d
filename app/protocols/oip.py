"""The Open Inference Protocol (KServe v2) codec: metadata, readiness, and ``infer``.

``infer`` takes images in the input ``image`` (BYTES: encoded images, base64 in JSON or raw in
binary data; or UINT8 ``[N, H, W, 3]`` pixels in binary data) and answers the output ``logits``
and, when asked for, ``cam``: each image's class activation map; with DFF, ``concepts`` (each
image's concept maps) and ``concept_labels`` (each concept's top labels). A detector answers
``boxes``, ``scores`` and ``labels`` instead of ``logits``, a segmenter ``mask``, and both
``cam`` for what ``box`` or ``class_idx`` and ``region`` explain (``app.protocols.oip_tasks``).

A transport calls, in order:

1. ``validated(InferenceRequest, data)`` (or its own parse) -> the request model;
2. ``read_inference(request, buffers, settings)`` -> an ``Inference``: the uploads, the explain
   parameters, the outputs wanted, the priority and the deadline; every refusal is a
   ``CamserveError`` raised before any image is decoded;
3. ``run_inference(explainer, name, version, inference)`` under the transport's own limits
   (deadline ``inference.timeout_s``, disconnect, drain) -> an ``InferenceResult`` whose
   ``outputs`` are ``OutputTensor``s: ``json_data()`` for JSON, ``raw()`` for binary data and
   gRPC's ``raw_output_contents``.

Triton's request parameters (``priority``, ``timeout``, ``binary_data_output``; ``sequence_*``
refused) are consumed here; the rest are explain parameters, read by ``build_params``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app import __version__
from app.cam import METHODS, UnknownMethod, find_method
from app.errors import BadRequest, InvalidParameter, InvalidTarget, clip
from app.models.loading import LoadedModel
from app.models.registry import ModelRegistry
from app.pipeline.decoding import Upload
from app.pipeline.explainer import Explainer, ExplainParams
from app.pipeline.params import OPTION_NAMES, build_params, unknown_name
from app.pipeline.results import ExplainResponse, ExplainResult, Prediction, PredictResult
from app.pipeline.scheduling import Priority
from app.protocols.binary import SIZE, bytes_elements
from app.protocols.images import EXAMPLE_IMAGE_B64, decode_images, pixel_images
from app.protocols.oip_maps import map_tensor
from app.protocols.oip_tasks import (
    MASK,
    TASK_OUTPUT_NAMES,
    TASK_OUTPUTS,
    output_names,
    predicted_outputs,
    task_cam,
)
from app.protocols.tensors import OutputTensor
from app.settings import Settings

INPUT = "image"
OUTPUT = "logits"
CAM = "cam"
#: DFF's concepts: their maps (FP32 [N, K, h, w]) and top labels (BYTES [N, K, top]).
CONCEPTS = "concepts"
CONCEPT_LABELS = "concept_labels"
#: A classifier's outputs; detectors and segmenters answer their own and ``cam``.
CLASSIFIER_OUTPUTS = (OUTPUT, CAM, CONCEPTS, CONCEPT_LABELS)
OUTPUTS = (*CLASSIFIER_OUTPUTS, *TASK_OUTPUT_NAMES)
#: The outputs that need an explanation.
EXPLAINED = (CAM, CONCEPTS, CONCEPT_LABELS)
#: The general explain parameters ``infer`` takes; the map is always raw (``output`` fixed).
EXPLAIN_PARAMETERS = (
    "method",
    "class_idx",
    "classes",
    "top_classes",
    "target_layer",
    "normalized",
    "faithfulness",
    "faithfulness_steps",
    "box",
    "region",
)
PLATFORM = "pytorch"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository", "statistics")
"""The protocol extensions camserve serves, as the server metadata lists them."""
MAX_RANK = 8
"""Most dimensions of an input's shape (images need two: the batch, and rows of it)."""
MAX_ELEMENTS = 256
"""Most elements of an input's data (CAMSERVE_MAX_IMAGES allows at most 256 images)."""
MAX_ID = 256
"""Longest request ``id``: it is echoed in the answer."""

MAX_WHOLE = 2**64 - 1
"""Largest whole-number parameter (``priority``, ``timeout``, ``classification``): uint64's."""
#: Triton's request parameters that camserve reads (and those it refuses, below).
TRITON_PARAMETERS = ("priority", "timeout", "binary_data_output")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
#: ``priority`` at or under this is interactive work; above it, background work (Triton: 1 is
#: the highest level, 0 the model's default).
INTERACTIVE_PRIORITY = 1
#: What an output's ``parameters`` may hold, besides the explain options of ``cam``.
OUTPUT_PARAMETERS = ("binary_data", "classification")


# ---------------------------------------------------------------------------- models


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
    data: list[Any] | None = Field(
        None,
        max_length=MAX_ELEMENTS,
        description="flat, or one list per row; left out when the tensor is binary data. A "
        "BYTES element is base64 text in JSON (``bytes`` from a transport that carries raw "
        "bytes)",
    )

    @field_validator("shape")
    @classmethod
    def _one_wildcard(cls, shape: list[int]) -> list[int]:
        if shape.count(-1) > 1:
            raise ValueError(f"at most one dimension may be -1; got {shape}")
        return shape

    @field_validator("data", mode="before")
    @classmethod
    def _no_json_pixels(cls, data: Any, info: ValidationInfo) -> Any:
        # Before the bound on elements: an image's pixels are thousands of them, and "at most
        # 256 items" named neither the datatype nor the fix.
        if data is not None and info.data.get("datatype") == "UINT8":
            raise ValueError(
                "send UINT8 pixels as binary data (a JSON list of pixels would be millions of "
                "items), or the encoded image as BYTES"
            )
        return data

    @field_validator("data")
    @classmethod
    def _short_rows(cls, data: list[Any] | None) -> list[Any] | None:
        if data is not None and any(
            isinstance(row, list) and len(row) > MAX_ELEMENTS for row in data
        ):
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
    datatype: Literal["FP32", "INT32", "BYTES"]
    parameters: dict[str, Any] | None = None
    data: list[float] | list[int] | list[str] | None = Field(
        None, description="row-major; left out when the output is binary data"
    )


class InferenceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "shapes",
                    "model_version": "1",
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
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


# ---------------------------------------------------------------------------- health, metadata


def server_metadata() -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name="camserve", version=__version__, extensions=list(EXTENSIONS))


def server_ready(registry: ModelRegistry, draining: bool) -> bool:
    """Every model loaded (or failed), and the service not draining."""
    return registry.ready and not draining


def model_ready(registry: ModelRegistry, name: str, version: int | None) -> bool:
    """Whether the model (that version, when given) can serve; ModelNotFound when unknown."""
    entry = registry.entry(name)
    if version is None:
        return entry.status == "ready"
    chosen = entry.versions.get(version)
    return chosen is not None and chosen.model is not None


def model_outputs(model: LoadedModel) -> list[TensorMetadata]:
    """The outputs an ``infer`` on ``model`` may ask for, batch dimension first: a classifier's
    ``logits`` (one row per image) or a detector's or a segmenter's own (``TASK_OUTPUTS``),
    ``cam`` (one map each) and, where a method that finds concepts (DFF) applies
    to the model, ``concepts`` (FP32 [N, K, h, w]) and ``concept_labels`` (BYTES [N, K, top])."""
    own = [
        TensorMetadata(name=o.name, datatype=o.datatype, shape=list(o.shape))
        for o in TASK_OUTPUTS.get(model.spec.task, ())
    ] or [TensorMetadata(name=OUTPUT, datatype="FP32", shape=[-1, model.spec.num_classes])]
    outputs = [*own, TensorMetadata(name=CAM, datatype="FP32", shape=[-1, -1, -1])]
    if any(METHODS[name].gives_concepts for name in model.applicable_methods):
        outputs += [
            TensorMetadata(name=CONCEPTS, datatype="FP32", shape=[-1, -1, -1, -1]),
            TensorMetadata(name=CONCEPT_LABELS, datatype="BYTES", shape=[-1, -1, -1]),
        ]
    return outputs


def model_metadata(registry: ModelRegistry, name: str, version: int | None) -> ModelMetadata:
    """The model's input (images) and outputs (``model_outputs``)."""
    model = registry.get(name, version)
    return ModelMetadata(
        name=model.spec.name,
        versions=[str(number) for number in sorted(registry.entry(name).versions)],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=model_outputs(model),
    )


# ---------------------------------------------------------------------------- reading a request


@dataclass(frozen=True)
class Wanted:
    """An output asked for: its name, whether it comes back as binary data, and for
    ``logits`` the classification extension's class count (0: the logits themselves)."""

    name: str
    binary: bool = False
    classification: int = 0


@dataclass(frozen=True)
class Inference:
    """What an ``infer`` request asks of the pipeline, read and checked."""

    uploads: list[Upload]
    params: ExplainParams | None
    """The explanation (output ``cam``); None for the logits only."""
    outputs: tuple[Wanted, ...]
    """In the order asked, no name twice; ``logits`` alone when the request named none."""
    named: bool = True
    """Whether the request named its outputs (a detector or segmenter answers its own, not
    ``logits``, when it named none)."""
    priority: Priority = "interactive"
    timeout_s: float | None = None
    """The request's deadline: Triton's ``timeout`` capped by CAMSERVE_REQUEST_TIMEOUT_S."""
    id: str | None = None


def read_inference(
    request: InferenceRequest,
    buffers: Sequence[bytes | memoryview | None] | None,
    settings: Settings,
) -> Inference:
    """An ``infer`` request -> what it asks, every refusal (BadRequest and the upload limits)
    raised before an image is decoded.

    ``buffers``: one per input, its raw data (the binary part's slice, or gRPC's
    ``raw_input_contents``), or None for an input whose data is in ``data``; None or empty when
    no input is raw."""
    parameters = dict(request.parameters or {})
    triton = _triton_parameters(parameters, settings)
    uploads = _uploads(request.inputs, buffers, settings)
    outputs, cam_options = _wanted(request.outputs, triton.binary_output)
    params = _explain_params(parameters, cam_options, any(o.name in EXPLAINED for o in outputs))
    return Inference(
        uploads=uploads,
        params=params,
        outputs=outputs,
        named=bool(request.outputs),
        priority=triton.priority,
        timeout_s=triton.timeout_s,
        id=request.id,
    )


@dataclass(frozen=True)
class _Triton:
    priority: Priority
    timeout_s: float | None
    binary_output: bool


def _whole(name: str, value: Any) -> int:
    # At most Triton's uint64: a larger JSON number (``timeout`` of 400 digits) is no
    # parameter a client means, and overflowed the float of the deadline (a 500).
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WHOLE:
        raise BadRequest(
            f"Parameter {name!r} must be a whole number from 0 to {MAX_WHOLE}; got {clip(value)}."
        )
    return value


def _triton_parameters(parameters: dict[str, Any], settings: Settings) -> _Triton:
    """Take Triton's parameters out of ``parameters`` (what is left is for the explanation)."""
    sequence = [name for name in SEQUENCE_PARAMETERS if name in parameters]
    if sequence:
        several = len(sequence) > 1
        raise BadRequest(
            f"{'Parameters' if several else 'Parameter'} {', '.join(sequence)} "
            f"{'are' if several else 'is'} for stateful (sequence) models; camserve's models "
            f"are stateless: send each request on its own, without {'them' if several else 'it'}."
        )
    priority = _whole("priority", parameters.pop("priority", 0))
    timeout_us = _whole("timeout", parameters.pop("timeout", 0))
    binary = parameters.pop("binary_data_output", False)
    if not isinstance(binary, bool):
        raise BadRequest(f"Parameter 'binary_data_output' must be true or false; got {binary!r}.")
    timeout_s = settings.request_timeout_s
    if timeout_us:
        asked = timeout_us / 1e6
        timeout_s = asked if timeout_s is None else min(asked, timeout_s)
    return _Triton(
        priority="interactive" if priority <= INTERACTIVE_PRIORITY else "background",
        timeout_s=timeout_s,
        binary_output=binary,
    )


def _wanted(
    outputs: Sequence[Any] | None, binary_default: bool
) -> tuple[tuple[Wanted, ...], dict[str, Any]]:
    """The outputs asked for, and the explain options given in ``cam``'s parameters."""
    if not outputs:
        return (Wanted(OUTPUT, binary=binary_default),), {}
    wanted: dict[str, Wanted] = {}
    cam_options: dict[str, Any] = {}
    for output in outputs:
        if output.name not in OUTPUTS:
            raise BadRequest(
                f"Unknown output {clip(output.name)}; this model has {', '.join(OUTPUTS)}."
            )
        if output.name in wanted:
            # Not merged: the second's parameters (another method, binary_data) won silently.
            raise BadRequest(
                f"The output {output.name!r} is asked for twice; ask for each output once "
                "(another method or class: another request)."
            )
        params = dict(output.parameters or {})
        binary = params.pop("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest(f"Output {output.name!r}: binary_data must be true or false.")
        classes = _whole("classification", params.pop("classification", 0))
        if classes and output.name != OUTPUT:
            raise BadRequest(f"Only the output {OUTPUT!r} takes 'classification'.")
        if output.name == CAM:
            _check_names(params, (*EXPLAIN_PARAMETERS, *OPTION_NAMES))
            cam_options.update(params)
        elif params:
            raise BadRequest(
                f"Output {output.name!r} takes the parameters {', '.join(OUTPUT_PARAMETERS)}; "
                f"got {clip(next(iter(params)))}."
            )
        wanted[output.name] = Wanted(output.name, binary=binary, classification=classes)
    return tuple(wanted.values()), cam_options


def _check_names(parameters: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Refuses a name that is none of ``allowed`` with the parameter rule's own refusal (the
    same message as every protocol's, the close matches included)."""
    for name in parameters:
        if name not in allowed:
            raise unknown_name(name, allowed)


def _explain_params(
    parameters: dict[str, Any], cam_options: Mapping[str, Any], explaining: bool
) -> ExplainParams | None:
    """The explanation asked for (output ``cam``), from the request's parameters and ``cam``'s;
    None for the logits only (explain parameters are then refused, not ignored)."""
    _check_names(parameters, (*TRITON_PARAMETERS, *EXPLAIN_PARAMETERS, *OPTION_NAMES))
    if not explaining:
        if parameters:
            raise BadRequest(
                f"Parameter {next(iter(parameters))!r} is for an explanation; add the output "
                f"{CAM!r} to the request's outputs."
            )
        return None
    for name, value in cam_options.items():
        if name in parameters and parameters[name] != value:
            raise BadRequest(
                f"Parameter {name!r} is {clip(parameters[name])} in the request but "
                f"{clip(value)} in the output {CAM!r}; send it once."
            )
    params = build_params(
        {**parameters, **cam_options}, accepted=EXPLAIN_PARAMETERS, fixed={"output": "raw"}
    )
    if params.method is not None and "," in params.method:
        raise BadRequest(f"The output {CAM!r} holds one map per image; send one method.")
    return params


def _fits(shape: Sequence[int], elements: int) -> bool:
    """Whether ``elements`` fill ``shape``, whose one -1 (if any) takes what the others leave."""
    if not shape:
        return False
    known = 1
    for dim in shape:
        known *= dim if dim >= 0 else 1
    if -1 in shape:
        return known > 0 and elements % known == 0
    return known == elements


def _uploads(
    inputs: Sequence[RequestInput],
    buffers: Sequence[bytes | memoryview | None] | None,
    settings: Settings,
) -> list[Upload]:
    """The images of the input ``image``, checked against its shape and datatype."""
    names = [tensor.name for tensor in inputs]
    if names != [INPUT]:
        raise BadRequest(
            f"Expected one input named {INPUT!r} (BYTES: encoded images; or UINT8 pixels "
            f"[N, H, W, 3]); got {', '.join(clip(n) for n in names[:5])}"
            f"{' ...' if len(names) > 5 else ''}."
        )
    tensor = inputs[0]
    raw = buffers[0] if buffers else None
    extra = [name for name in tensor.parameters or {} if name != SIZE]
    if extra:
        raise BadRequest(
            f"Input {INPUT!r}: unknown parameter {clip(extra[0])}; an input takes only {SIZE}."
        )
    if raw is not None and tensor.data is not None:
        raise BadRequest(f"Input {INPUT!r} has both data and binary data; send one.")
    if raw is None and tensor.data is None:
        raise BadRequest(f"Input {INPUT!r} has no data; send its data, or its binary data.")
    if tensor.datatype == "UINT8":  # raw: RequestInput refuses UINT8 data in JSON
        return pixel_images(INPUT, tensor.shape, bytes(raw or b""), settings)
    if tensor.datatype != "BYTES":
        raise BadRequest(
            f"Input {INPUT!r} must have datatype BYTES (encoded images) or UINT8 (pixels "
            f"[N, H, W, 3]); got {clip(tensor.datatype)}."
        )
    if raw is not None:
        elements: list[Any] = bytes_elements(INPUT, raw, most=settings.max_images)
        if len(elements) > settings.max_images:  # the rest was not read
            raise InvalidParameter(
                f"More than {settings.max_images} images sent in input {INPUT!r}, but at most "
                f"{settings.max_images} are accepted per request (CAMSERVE_MAX_IMAGES); split "
                "the batch."
            )
    else:
        # Row-major data may come flat or nested one level per row.
        elements = [
            part
            for item in tensor.data or []
            for part in (item if isinstance(item, list) else [item])
        ]
        if not all(isinstance(item, str | bytes) for item in elements):
            raise BadRequest(f"Input {INPUT!r} must hold base64 strings, one image per batch row.")
    if not elements:
        # Not "use shape [0]": an image is what the request is for.
        raise BadRequest(f"No image in input {INPUT!r}; send at least one encoded image.")
    if not _fits(tensor.shape, len(elements)):
        raise BadRequest(
            f"Input {INPUT!r} has shape {tensor.shape} but {len(elements)} element(s); use shape "
            f"[{len(elements)}] for {len(elements)} image(s)."
        )
    return decode_images([(f"image{i}", item) for i, item in enumerate(elements)], settings)


# ---------------------------------------------------------------------------- running, answering


@dataclass(frozen=True)
class InferenceResult:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


async def run_inference(
    explainer: Explainer,
    name: str,
    version: int | None,
    inference: Inference,
    scope: str | None = None,
) -> InferenceResult:
    """Run what ``inference`` asks (one predict or one explain call) and render the outputs
    wanted. The caller applies the deadline (``inference.timeout_s``) and its other limits;
    ``scope``: whose cached explanations it may use (``Explainer.explain``)."""
    model = explainer.registry.get(name, version)
    if model.spec.task in TASK_OUTPUTS:
        return await _run_task(explainer, name, version, inference, scope)
    for wanted in inference.outputs:
        if wanted.name in TASK_OUTPUT_NAMES:
            raise InvalidTarget(
                f"The output {wanted.name!r} is a {TASK_OUTPUT_NAMES[wanted.name]} model's; "
                f"{model.spec.name!r} is a classifier, whose outputs are "
                f"{', '.join(CLASSIFIER_OUTPUTS)}.",
                details={"output": wanted.name, "task": model.spec.task},
            )
    classes = model.spec.num_classes
    made: dict[str, OutputTensor] = {}
    if inference.params is None:
        answer = await explainer.predict(
            name, inference.uploads, top_k=classes, version=version, priority=inference.priority
        )
        model_name, served = answer.model, answer.version
        rows = [_row(result.predictions, classes) for result in answer.results]
    else:
        _check_concepts_wanted(model.spec.default_method, inference)
        explained = await explainer.explain(
            name,
            inference.uploads,
            inference.params,
            version=version,
            priority=inference.priority,
            scope=scope,
        )
        model_name, served = explained.model, explained.version
        rows = [result.logits for result in explained.results]
        made[CAM] = _cams(explained)
        made.update(concept_outputs(explained))
    labels = model.spec.labels
    outputs = []
    for wanted in inference.outputs:
        if wanted.name == OUTPUT:
            tensor = (
                classification(rows, wanted.classification, labels)
                if wanted.classification
                else _logits(rows)
            )
        else:
            tensor = made[wanted.name]
        outputs.append(
            OutputTensor(
                tensor.name,
                tensor.datatype,
                tensor.shape,
                tensor.values,
                tensor.parameters,
                binary=wanted.binary,
            )
        )
    return InferenceResult(model_name, str(served), outputs, inference.id)


async def _run_task(
    explainer: Explainer,
    name: str,
    version: int | None,
    inference: Inference,
    scope: str | None,
) -> InferenceResult:
    """A detector's or a segmenter's ``infer``: its own outputs (all of them when the request
    named none) from /predict's pass, or with ``cam`` from /explain's (which carries the
    detections; a segmenter's ``mask`` then takes a pass of its own)."""
    model = explainer.registry.get(name, version)
    task = model.spec.task
    allowed = (*output_names(task), CAM)
    wanted = (
        inference.outputs
        if inference.named
        else tuple(Wanted(n, binary=inference.outputs[0].binary) for n in output_names(task))
    )
    for one in wanted:
        if one.name not in allowed:
            raise InvalidTarget(
                f"{model.spec.name!r} is a {task} model; its outputs are {', '.join(allowed)}, "
                f"not {one.name!r}.",
                details={"output": one.name, "task": task},
            )
        if one.classification:
            raise BadRequest(f"Only a classifier's output {OUTPUT!r} takes 'classification'.")
    names = {one.name for one in wanted}
    mask = ("mask",) if MASK in names else ()
    made: dict[str, OutputTensor] = {}
    if inference.params is None:
        predicted = await explainer.predict(
            name, inference.uploads, 1, version=version, priority=inference.priority, outputs=mask
        )
        model_name, served = predicted.model, predicted.version
        made.update(await _predicted_outputs(predicted.results))
    else:
        explained = await explainer.explain(
            name,
            inference.uploads,
            inference.params,
            version=version,
            priority=inference.priority,
            scope=scope,
        )
        model_name, served = explained.model, explained.version
        made[CAM] = task_cam(CAM, explained)
        made.update(await _predicted_outputs(explained.results))
        if mask:
            predicted = await explainer.predict(
                name, inference.uploads, 1, served, inference.priority, outputs=mask
            )
            made.update(await _predicted_outputs(predicted.results))
    outputs = [
        OutputTensor(t.name, t.datatype, t.shape, t.values, t.parameters, binary=one.binary)
        for one in wanted
        for t in (made[one.name],)
    ]
    return InferenceResult(model_name, str(served), outputs, inference.id)


async def _predicted_outputs(
    results: Sequence[PredictResult | ExplainResult],
) -> dict[str, OutputTensor]:
    """``predicted_outputs`` on a worker thread: a segmenter's masks (a PNG each, decoded and
    stacked: millions of pixels) took a second on the event loop."""
    return await anyio.to_thread.run_sync(predicted_outputs, results)


def _row(predictions: list[Prediction], classes: int) -> list[float]:
    row = [0.0] * classes
    for prediction in predictions:
        row[prediction.class_idx] = prediction.logit
    return row


def _logits(rows: Sequence[Sequence[float]]) -> OutputTensor:
    return OutputTensor(
        name=OUTPUT,
        datatype="FP32",
        shape=(len(rows), len(rows[0]) if rows else 0),
        values=[value for row in rows for value in row],
    )


def classification(
    rows: Sequence[Sequence[float]], count: int, labels: Sequence[str] | None
) -> OutputTensor:
    """The classification extension: each row's ``count`` highest scores, highest first, as
    BYTES ``"value:index:label"`` (``"value:index"`` for a model without labels), as Triton
    writes them."""
    count = min(count, len(rows[0]) if rows else 0)
    values = []
    for row in rows:
        top = sorted(range(len(row)), key=lambda i: (-row[i], i))[:count]
        for index in top:
            text = f"{row[index]:f}:{index}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            values.append(text.encode())
    return OutputTensor(name=OUTPUT, datatype="BYTES", shape=(len(rows), count), values=values)


def _cams(answer: ExplainResponse) -> OutputTensor:
    """Each image's map (the fused one when there are several layers), stacked, with what
    made it as the output's parameters. With several classes (``classes``, ``top_classes``)
    each image gives one map per class, image by image: the rows are images x classes, and
    ``class_idx`` lists the class of each row."""
    explained = [e for result in answer.results for e in result.explanations]
    per_image = len(answer.results[0].explanations)
    return map_tensor(
        CAM,
        answer,
        {
            "class_idx": ",".join(str(e.class_idx) for e in explained),
            **({"classes_per_image": per_image} if per_image > 1 else {}),
        },
    )


def _check_concepts_wanted(default_method: str, inference: Inference) -> None:
    """The concept outputs need a method that finds concepts (DFF): refused before the work."""
    wanted = [o.name for o in inference.outputs if o.name in (CONCEPTS, CONCEPT_LABELS)]
    if not wanted or inference.params is None:
        return
    try:
        method, cls = find_method(inference.params.method or default_method)
    except UnknownMethod:
        return  # the explainer refuses it, with the model's methods
    if not cls.gives_concepts:
        finders = [name for name, c in METHODS.items() if c.gives_concepts]
        raise BadRequest(
            f"The output {wanted[0]!r} holds the concepts of {', '.join(finders)}; {method} "
            f"finds none. Ask for method={finders[0]} or drop the output {wanted[0]!r}."
        )


def concept_outputs(answer: ExplainResponse) -> dict[str, OutputTensor]:
    """DFF's concepts: each image's concept maps stacked (FP32 [N, K, h, w], raw maps) and
    their top labels (BYTES [N, K, top], ``"probability:index:label"``, as the classification
    extension writes a class); none for a method without concepts."""
    found = [result.explanations[0].concepts for result in answer.results]
    if any(concepts is None for concepts in found) or not found or not found[0]:
        return {}
    rows = [concepts or [] for concepts in found]
    raws = [[c.map.model_dump(include={"raw"})["raw"] for c in row] for row in rows]
    shape = raws[0][0]["shape"]
    top = len(rows[0][0].top_labels)
    parameters = {"method": answer.method, "layer": rows[0][0].map.layer}
    return {
        CONCEPTS: OutputTensor(
            name=CONCEPTS,
            datatype="FP32",
            shape=(len(rows), len(rows[0]), *shape),
            values=[v for row in raws for raw in row for line in raw["values"] for v in line],
            parameters={**parameters, "normalized": raws[0][0]["normalized"]},
        ),
        CONCEPT_LABELS: OutputTensor(
            name=CONCEPT_LABELS,
            datatype="BYTES",
            shape=(len(rows), len(rows[0]), top),
            values=[
                f"{label.probability:f}:{label.class_idx}:{label.label}".encode()
                for row in rows
                for concept in row
                for label in concept.top_labels
            ],
            parameters=parameters,
        ),
    }


def answer_json(
    result: InferenceResult, with_data: bool = True
) -> tuple[dict[str, Any], list[bytes]]:
    """The answer as the protocol's JSON object, and the binary part's buffers in order (each
    binary output's parameters say its ``binary_data_size``; no buffers: a JSON-only answer).
    ``with_data=False``: without the JSON outputs' ``data`` (``answer_text`` writes it)."""
    outputs: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for tensor in result.outputs:
        shown: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        parameters = dict(tensor.parameters)
        if tensor.binary:
            raw = tensor.raw()
            buffers.append(raw)
            parameters[SIZE] = len(raw)
        if parameters:
            shown["parameters"] = parameters
        if not tensor.binary and with_data:
            shown["data"] = tensor.json_data()
        outputs.append(shown)
    body: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
    if result.id is not None:
        body["id"] = result.id
    body["outputs"] = outputs
    return body, buffers


def answer_text(result: InferenceResult) -> tuple[bytes, list[bytes]]:
    """``answer_json`` written as JSON text (compact), each output's data a piece at a time
    (``OutputTensor.json_text``), and the binary part's buffers."""
    body, buffers = answer_json(result, with_data=False)
    compact = (",", ":")
    parts = [json.dumps({k: v for k, v in body.items() if k != "outputs"}, separators=compact)]
    parts[0] = parts[0][:-1] + ',"outputs":['
    for number, (shown, tensor) in enumerate(zip(body["outputs"], result.outputs, strict=True)):
        text = json.dumps(shown, separators=compact)
        if number:
            parts.append(",")
        if tensor.binary:
            parts.append(text)
            continue
        pieces = [piece for piece in tensor.json_text() if piece]
        parts += [text[:-1], ',"data":[', ",".join(pieces), "]}"]
    parts.append("]}")
    return "".join(parts).encode(), buffers
