"""The answers the pipeline builds (predictions, explanations, timings, jobs), as pydantic models
shared by every protocol and shown with examples on /docs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.pipeline.rendering import OUTPUT_KINDS


def with_example(example: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code")
    message: str = Field(description="what went wrong and how to fix it")
    details: dict[str, Any] | None = None


class Prediction(BaseModel):
    class_idx: int
    label: str
    logit: float
    probability: float = Field(
        description="the class's softmax over the classes, or its logit's sigmoid for a "
        "multi-label model (its manifest's probabilities)"
    )


class Detection(BaseModel):
    """One box of a detector's answer."""

    box: list[float] = Field(description="[x0, y0, x1, y1] in the upload's pixels")
    class_idx: int
    label: str
    score: float


class Segment(BaseModel):
    """One class present in a segmenter's answer."""

    class_idx: int
    label: str
    pixels: int = Field(description="pixels of the upload predicted as this class")
    box: list[int] = Field(
        description="[x0, y0, x1, y1] bounding the class's predicted mask, in the upload's pixels"
    )


class PredictResult(BaseModel):
    filename: str
    width: int
    height: int
    predictions: list[Prediction] = Field(
        description="top-k classes, most probable first (empty for detection and segmentation)"
    )
    detections: list[Detection] | None = Field(
        None,
        description="detection models: the boxes above the model's score threshold, best first",
    )
    segments: list[Segment] | None = Field(
        None, description="segmentation models: every class present, largest first"
    )
    mask: str | None = Field(
        None,
        description="segmentation with output=mask: the label mask at the upload's size, a base64 "
        "8-bit PNG whose pixel values are class indices",
    )


class PredictTimings(BaseModel):
    decode_ms: float
    queue_ms: float
    forward_ms: float
    total_ms: float
    batch_images: int = Field(
        description="images in the forward this request shared with others (its own included)"
    )


class PredictResponse(BaseModel):
    model_config = with_example(
        {
            "model": "shapes",
            "version": 1,
            "device": "cpu",
            "timings": {
                "decode_ms": 1.2,
                "queue_ms": 0.1,
                "forward_ms": 4.8,
                "total_ms": 6.5,
                "batch_images": 1,
            },
            "results": [
                {
                    "filename": "circle.png",
                    "width": 128,
                    "height": 128,
                    "predictions": [
                        {"class_idx": 0, "label": "circle", "logit": 9.1, "probability": 0.99}
                    ],
                }
            ],
        }
    )
    model: str
    version: int = Field(
        1, description="the model's version that answered (1 for a folder without versions)"
    )
    device: str
    timings: PredictTimings
    results: list[PredictResult]


class Faithfulness(BaseModel):
    """How far to trust a map: the scores of the metrics the request named (the others null).

    Probabilities are the explained class's, by the model's rule (softmax, or a multi-label
    model's sigmoid); every number lies in [0, 1]."""

    deletion_auc: float | None = Field(
        None,
        description="area under the class probability while the most salient pixels are "
        "replaced by the mean colour (RISE deletion); lower is better",
    )
    insertion_auc: float | None = Field(
        None,
        description="area under the class probability while the most salient pixels are "
        "restored into a blurred copy (RISE insertion); higher is better",
    )
    steps: int | None = Field(None, description="steps of the deletion and insertion curves")
    confidence_drop: float | None = Field(
        None,
        description="share of the class probability lost when the image is multiplied by its "
        "map, max(0, p - p_map) / p (Grad-CAM++'s Average Drop, per map); lower is better",
    )
    confidence_increase: bool | None = Field(
        None,
        description="whether the image multiplied by its map scores higher than the image "
        "(Grad-CAM++'s Increase in Confidence, per map)",
    )
    road_morf: float | None = Field(
        None,
        description="ROAD: mean class probability once the most relevant pixels are removed "
        "and imputed, over road_percentiles; lower is better",
    )
    road_lerf: float | None = Field(
        None,
        description="ROAD: the same with the least relevant pixels removed first; higher is better",
    )
    road_percentiles: list[int] | None = Field(
        None, description="the shares of pixels (in %) that ROAD removed"
    )


class _MapBase(BaseModel):
    layer: str = Field(
        description="target layer name, or 'fused' for the fusion of all layers (a concept's "
        "map: the layer it was found in)"
    )
    kind: Literal["layer", "fused", "concept"]
    width: int | None = Field(
        None, description="width of the overlay/heatmap pictures; null when none was asked for"
    )
    height: int | None = Field(None, description="height of the overlay/heatmap pictures")
    region: list[int] | None = Field(
        None,
        description="[left, top, right, bottom] of the pictures that the map covers (the model's "
        "crop of the upload), in the pictures' pixels",
    )
    faithfulness: Faithfulness | None = Field(
        None, description="the map's faithfulness scores, when the request asked for them"
    )


# One optional field per output kind, declared once in app.pipeline.rendering.OUTPUT_KINDS.
MapOutput = create_model(  # type: ignore[call-overload]
    "MapOutput",
    __base__=_MapBase,
    **{
        kind.name: (kind.value_type | None, Field(None, description=kind.description))
        for kind in OUTPUT_KINDS.values()
    },
)


class ConceptLabel(BaseModel):
    class_idx: int
    label: str
    score: float = Field(description="the model's head applied to the concept: fc(H_k)[class]")
    probability: float = Field(
        description="those scores as probabilities, by the model's rule (softmax over the "
        "classes, or each score's sigmoid for a multi-label model)"
    )


class Concept(BaseModel):
    index: int = Field(description="the concept's number k, from 0")
    top_labels: list[ConceptLabel] = Field(
        description="the classes the head scores highest for this concept (top_k of them)"
    )
    map: MapOutput = Field(
        description="where the image shows the concept, with the outputs asked for"
    )


class Explanation(BaseModel):
    method: str = Field(description="the CAM method of these maps")
    class_idx: int
    label: str
    logit: float
    probability: float
    maps: list[MapOutput] = Field(description="one per target layer, then 'fused' if several")
    concepts: list[Concept] | None = Field(
        None,
        description="DFF only: the concepts its factorization found in the image, each with its "
        "map and top labels; null for every other method",
    )
    box: list[float] | None = Field(
        None,
        description="detection: the explained box, [x0, y0, x1, y1] in the upload's pixels; "
        "segmentation: the bounds of the explained region",
    )
    score: float | None = Field(
        None, description="detection: the explained box's score (logit and probability hold it too)"
    )
    detection: int | None = Field(None, description="detection: the index of the explained box")
    region: str | None = Field(
        None, description="segmentation: the explained region (mask, box:x0,y0,x1,y1 or upload)"
    )


class ExplainResult(BaseModel):
    filename: str
    width: int
    height: int
    predictions: list[Prediction]
    logits: list[float]
    explanations: list[Explanation]
    detections: list[Detection] | None = Field(
        None, description="detection models: every box of the explained pass, best first"
    )
    segments: list[Segment] | None = Field(
        None, description="segmentation models: every class present, largest first"
    )


class ExplainTimings(BaseModel):
    decode_ms: float
    queue_ms: float
    forward_ms: float
    cam_ms: float
    encode_ms: float
    total_ms: float
    batch_images: int = Field(
        description="images in the pass this request shared with others (its own included)"
    )
    cam_ms_by_method: dict[str, float] = Field(
        description="cam_ms of each method, in the order asked (they add up to cam_ms)"
    )
    cache: Literal["hit", "miss", "bypass", "off"] = Field(
        "off",
        description="the explanation cache: `hit` (answered from it, without the model: the "
        "stage times are 0), `miss` (computed, then kept), `bypass` (a random method without "
        "a seed: computed, never kept) or `off` (CAMSERVE_CACHE_MB=0); also in the "
        "X-Camserve-Cache header of /explain",
    )
    forwards: int = Field(
        0,
        description="the model's forwards that the passes of this request ran, each batch once "
        "(the hooked forward, a detector's or segmenter's forward for its answer, and the masked "
        "or noisy forwards of methods that run them); a pass shared with other requests counts "
        "for each of them",
    )
    faithfulness_ms: float | None = Field(
        None, description="scoring the maps' faithfulness (its pass and waits); null if none"
    )


class ExplainResponse(BaseModel):
    model_config = with_example(
        {
            "model": "shapes",
            "version": 1,
            "device": "cpu",
            "method": "GradCAM",
            "target_layers": ["layer3"],
            "options": {},
            "image_format": "png",
            "media_type": "image/png",
            "timings": {
                "decode_ms": 1.1,
                "queue_ms": 0.1,
                "forward_ms": 5.3,
                "cam_ms": 3.9,
                "encode_ms": 6.0,
                "total_ms": 16.6,
                "batch_images": 1,
                "cam_ms_by_method": {"GradCAM": 3.9},
                "cache": "miss",
            },
            "results": [
                {
                    "filename": "circle.png",
                    "width": 128,
                    "height": 128,
                    "predictions": [
                        {"class_idx": 0, "label": "circle", "logit": 9.1, "probability": 0.99}
                    ],
                    "logits": [9.1, -1.2, 0.3, -2.0, -0.4, 1.1, -3.3, 0.2],
                    "explanations": [
                        {
                            "method": "GradCAM",
                            "class_idx": 0,
                            "label": "circle",
                            "logit": 9.1,
                            "probability": 0.99,
                            "maps": [
                                {
                                    "layer": "layer3",
                                    "kind": "layer",
                                    "width": 128,
                                    "height": 128,
                                    "region": [0, 0, 128, 128],
                                    "overlay": "iVBORw0KGgoAAAANSUhEUgAA...",
                                    "heatmap": None,
                                    "raw": None,
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    )
    model: str
    version: int = Field(
        1, description="the model's version that answered (1 for a folder without versions)"
    )
    device: str
    method: str = Field(
        description="the method; several (in the order asked) are joined by commas, and each "
        "explanation names its own"
    )
    target_layers: list[str]
    options: dict[str, Any]
    image_format: str
    media_type: str
    timings: ExplainTimings
    results: list[ExplainResult]


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobProgress(BaseModel):
    done: int = Field(description="masked or noisy forwards done (inputs, not batches)")
    total: int = Field(description="masked or noisy forwards in all; 0 for methods that run none")
    eta_s: float | None = Field(None, description="seconds left at the pace so far")


class JobView(BaseModel):
    """A job's state; ``result`` is exactly the body /explain would have answered."""

    id: str
    status: JobStatus
    url: str
    created: datetime
    started: datetime | None = None
    finished: datetime | None = None
    progress: JobProgress
    result: ExplainResponse | None = None
    error: ErrorDetail | None = Field(None, description="why the job failed or was cancelled")
