"""Detection: /predict answers the boxes; /explain explains boxes (``box=K``, repeatable, or
``box=all``), each by the score of its class on the box that matches it on the explained pass
(``app.cam.task_targets.BoxScore``); D-RISE by the similarity of each masked image's detections
to it (``DetectionSimilarity``), which the faithfulness curves of every method follow too."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import torch

from app.cam import Target
from app.cam.task_targets import BoxScore, DetectionSimilarity
from app.digits import whole_number
from app.errors import InvalidTarget
from app.models.loading import LoadedModel
from app.pipeline.decoding import DecodedImage
from app.pipeline.passes import CamPlan
from app.pipeline.results import Detection
from app.pipeline.tasks.base import ExplainParams, TaskPipeline, Wanted
from app.pipeline.tasks.common import MAX_EXPLAINED_BOXES, Outline, Scale

ALL = "all"


def _target(output: dict[str, torch.Tensor], row: int, plan: CamPlan) -> Target:
    """What ``plan`` explains of detection ``row``: a method that compares detections (D-RISE)
    gets the detection itself; the others its class's score on the matching box."""
    if plan.cls.explains_detections:
        return DetectionSimilarity.of(output, row)
    return BoxScore(output["boxes"][row], int(output["labels"][row]))


def kept(model: LoadedModel, output: dict[str, torch.Tensor]) -> list[int]:
    """The rows of a detector's output that are answered: score at least the model's
    threshold, best first, at most ``max_detections``."""
    scores = output["scores"].detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    rows = [i for i in order if float(scores[i]) >= model.spec.score_threshold]
    return rows[: model.spec.max_detections]


def detections(model: LoadedModel, decoded: DecodedImage, output: Any) -> list[Detection]:
    scale = Scale.of(decoded)
    boxes = output["boxes"].detach().float().cpu()
    labels = output["labels"].detach().cpu()
    scores = output["scores"].detach().float().cpu()
    answered = []
    for row in kept(model, output):
        label = int(labels[row])
        answered.append(
            Detection(
                box=scale.box(boxes[row].tolist()),
                class_idx=label,
                label=model.labels[label] if label < len(model.labels) else str(label),
                score=round(float(scores[row]), 6),
            )
        )
    return answered


def chosen_boxes(wanted: Sequence[str]) -> list[int] | None:
    """The indices ``box`` asks for (None: ``all``); a malformed one is refused."""
    if not wanted:
        return [0]
    if any(w.strip().lower() == ALL for w in wanted):
        if len(wanted) > 1:
            raise InvalidTarget("box=all explains every detection; send it alone.")
        return None
    indices = []
    for text in wanted:
        index = whole_number(text)
        if index is None:
            raise InvalidTarget(
                f"box must be a detection's index (0 for the top one) or 'all', got {text[:40]!r}.",
                details={"parameter": "box"},
            )
        indices.append(index)
    if len(set(indices)) > MAX_EXPLAINED_BOXES:
        raise InvalidTarget(
            f"box names {len(set(indices))} detections; at most {MAX_EXPLAINED_BOXES} are "
            "explained per request.",
            details={"parameter": "box"},
        )
    return list(dict.fromkeys(indices))


class DetectionPipeline(TaskPipeline):
    task: ClassVar[str] = "detection"
    own_parameters: ClassVar[tuple[str, ...]] = ("box",)
    picked_by: ClassVar[str] = "box (box=all for every detection)"

    def answer(
        self, model: LoadedModel, decoded: DecodedImage, output: Any, outputs: Sequence[str]
    ) -> dict[str, Any]:
        return {"detections": detections(model, decoded, output)}

    def check_params(self, model: LoadedModel, params: ExplainParams, images: int) -> int:
        if params.region is not None:
            raise InvalidTarget(
                "region is for segmentation models; a detector explains boxes: send box=K.",
                details={"parameter": "region"},
            )
        if params.class_idx:
            raise InvalidTarget(
                "class_idx does not apply to a detector: send box=K (the K-th detection of "
                "/predict) to explain a box.",
                details={"parameter": "class_idx"},
            )
        chosen = chosen_boxes(params.boxes)
        return MAX_EXPLAINED_BOXES if chosen is None else len(chosen)

    def wanted(
        self,
        model: LoadedModel,
        decoded: DecodedImage,
        index: int,
        output: Any,
        params: ExplainParams,
    ) -> tuple[dict[str, Any], list[Wanted]]:
        answered = detections(model, decoded, output)
        rows = kept(model, output)
        chosen = chosen_boxes(params.boxes)
        if chosen is None:
            chosen = list(range(min(len(rows), MAX_EXPLAINED_BOXES)))
        past = [k for k in chosen if k >= len(rows)]
        if past:
            raise InvalidTarget(
                f"box {past[0]} is past the detections of {decoded.filename or 'the image'}: it "
                f"has {len(rows)} above the score threshold {model.spec.score_threshold} "
                + (f"(valid: 0..{len(rows) - 1})." if rows else "(none to explain)."),
                details={"parameter": "box", "detections": len(rows)},
            )
        wanted = []
        for k in chosen:
            found = answered[k]
            wanted.append(
                Wanted(
                    partial(_target, output, rows[k]),
                    {
                        "class_idx": found.class_idx,
                        "label": found.label,
                        "logit": found.score,
                        "probability": found.score,
                        "box": found.box,
                        "score": found.score,
                        "detection": k,
                    },
                    DetectionSimilarity.of(output, rows[k]),
                    [Outline(found.box, f"{found.label} {found.score:.2f}")],
                )
            )
        return {"detections": answered}, wanted
