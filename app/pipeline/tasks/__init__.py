"""The request flows of the tasks other than classification (``app.models.tasks``), one module
each; the explainer hands a detector's or segmenter's request to its task's pipeline."""

from __future__ import annotations

from app.cam import UnknownMethod, find_method
from app.errors import InvalidTarget
from app.models.tasks import task_of
from app.pipeline.tasks.base import ExplainParams, TaskPipeline
from app.pipeline.tasks.detection import DetectionPipeline
from app.pipeline.tasks.segmentation import SegmentationPipeline

PIPELINES: dict[str, TaskPipeline] = {
    pipeline.task: pipeline for pipeline in (DetectionPipeline(), SegmentationPipeline())
}


def pipeline_for(task: str) -> TaskPipeline | None:
    """The pipeline of ``task``; None for classification (the explainer's own flow)."""
    return PIPELINES.get(task)


def refuse_task_parameters(params: ExplainParams, outputs: tuple[str, ...] = ()) -> None:
    """A classifier's request with a detector's or segmenter's parameter: a 400 naming it."""
    if params.boxes:
        raise InvalidTarget(
            "box is for detection models; this model is a classifier: send class_idx to pick "
            "the class to explain.",
            details={"parameter": "box"},
        )
    if params.region is not None:
        raise InvalidTarget(
            "region is for segmentation models; this model is a classifier.",
            details={"parameter": "region"},
        )
    classification = task_of("classification")
    for wanted in (params.method or "").split(","):
        try:
            method, _ = find_method(wanted)
        except UnknownMethod:
            continue  # resolve_methods names the close matches
        reason = classification.method_reason(method)
        if reason is not None:
            raise InvalidTarget(f"{reason}.", details={"parameter": "method", "method": method})


__all__ = ["PIPELINES", "TaskPipeline", "pipeline_for", "refuse_task_parameters"]
