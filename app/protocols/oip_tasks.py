"""The Open Inference Protocol's outputs of detectors and segmenters, declared once per task
(the model metadata, Triton's config and the checks of a request's outputs derive from
``TASK_OUTPUTS``) and built from the pipeline's one answer.

- detection: ``boxes`` (FP32 [N, 4]: x0, y0, x1, y1 in the upload's pixels), ``scores`` (FP32
  [N]) and ``labels`` (BYTES [N]): every detection of every image, best first, image after
  image (with several images, ``detections_per_image`` says how many rows each has);
- segmentation: ``mask`` (INT32 [N, H, W]: each pixel's predicted class, at the upload's size);
- both: the map of what was explained (``box``; ``class_idx`` over ``region``) as ``cam`` (FP32
  [E, h, w], one row per explanation, image after image: ``app.protocols.oip_maps``), with what
  each row explains, and its faithfulness scores when asked for.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.pipeline.results import ExplainResponse, ExplainResult, PredictResult
from app.protocols.oip_maps import map_tensor
from app.protocols.tensors import Datatype, OutputTensor, one_size

BOXES, SCORES, LABELS, MASK = "boxes", "scores", "labels", "mask"


@dataclass(frozen=True)
class TaskOutput:
    """One output a task's model answers, as its metadata declares it."""

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    """With the batch dimension (-1: any size)."""


TASK_OUTPUTS: dict[str, tuple[TaskOutput, ...]] = {
    "detection": (
        TaskOutput(BOXES, "FP32", (-1, 4)),
        TaskOutput(SCORES, "FP32", (-1,)),
        TaskOutput(LABELS, "BYTES", (-1,)),
    ),
    "segmentation": (TaskOutput(MASK, "INT32", (-1, -1, -1)),),
}
#: Every task's output names (a classifier refuses them, naming the task they belong to).
TASK_OUTPUT_NAMES: dict[str, str] = {
    output.name: task for task, outputs in TASK_OUTPUTS.items() for output in outputs
}


def output_names(task: str) -> tuple[str, ...]:
    return tuple(output.name for output in TASK_OUTPUTS[task])


def predicted_outputs(results: Sequence[PredictResult | ExplainResult]) -> dict[str, OutputTensor]:
    """The task's own outputs of each image's answer: boxes, scores and labels of its
    detections; its label mask (when the answer carries it: /predict's ``output=mask``)."""
    made: dict[str, OutputTensor] = {}
    if results and results[0].detections is not None:
        found = [result.detections or [] for result in results]
        rows = [detection for image in found for detection in image]
        per_image = (
            {"detections_per_image": ",".join(str(len(image)) for image in found)}
            if len(found) > 1
            else {}
        )
        made[BOXES] = OutputTensor(
            BOXES, "FP32", (len(rows), 4), [v for d in rows for v in d.box], dict(per_image)
        )
        made[SCORES] = OutputTensor(
            SCORES, "FP32", (len(rows),), [d.score for d in rows], dict(per_image)
        )
        made[LABELS] = OutputTensor(
            LABELS,
            "BYTES",
            (len(rows),),
            [d.label.encode() for d in rows],
            {"class_idx": ",".join(str(d.class_idx) for d in rows), **per_image},
        )
    masks = [getattr(result, "mask", None) for result in results]
    if results and all(mask is not None for mask in masks):
        arrays = [_label_mask(mask) for mask in masks if mask is not None]
        one_size(MASK, [a.shape for a in arrays])
        made[MASK] = OutputTensor(
            MASK,
            "INT32",
            (len(arrays), *arrays[0].shape),
            np.stack(arrays).astype(np.int32).ravel(),
        )
    return made


def _label_mask(png: str) -> np.ndarray:
    """/predict's ``mask`` (a base64 8-bit PNG of class indices) as (H, W) class indices."""
    with Image.open(io.BytesIO(base64.b64decode(png))) as picture:
        return np.asarray(picture, dtype=np.int32)


def task_cam(name: str, answer: ExplainResponse) -> OutputTensor:
    """The explained maps (``map_tensor``), with what each explains as comma-separated
    parameters: ``class_idx``, and a detector's ``detection`` (its index in ``boxes``) and
    ``score``, a segmenter's ``region``; ``explanations_per_image`` with several images."""
    explained = [e for result in answer.results for e in result.explanations]

    def listed(field: str) -> dict[str, str]:
        values = [getattr(e, field) for e in explained]
        if not values or any(value is None for value in values):
            return {}
        return {field: ",".join(map(str, values))}

    per_image = [len(result.explanations) for result in answer.results]
    return map_tensor(
        name,
        answer,
        {
            **listed("class_idx"),
            **listed("detection"),
            **listed("score"),
            **listed("region"),
            **(
                {"explanations_per_image": ",".join(map(str, per_image))}
                if len(per_image) > 1
                else {}
            ),
        },
    )
