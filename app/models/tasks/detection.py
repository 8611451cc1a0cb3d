"""Detection: the model answers one dict per image with ``boxes`` (x0, y0, x1, y1 in the
input's pixels), ``scores`` and ``labels``, as torchvision's detectors do in eval mode."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from app.models.manifest import ManifestError, ModelSpec
from app.models.tasks.base import ModelTask

#: The methods whose target may be any scalar of the output (a box's class score) and that need
#: no classifier head: the gradient family, the Eigen methods and Ablation-CAM.
MAP_METHODS = (
    "GradCAM",
    "GradCAMpp",
    "XGradCAM",
    "LayerCAM",
    "HiResCAM",
    "GradCAMElementWise",
    "EigenCAM",
    "EigenGradCAM",
    "AblationCAM",
)
#: A detector's: those, and D-RISE (black-box, it compares the detections of masked images).
DETECTION_METHODS = (*MAP_METHODS, "DRISE")


class Detection(ModelTask):
    name: ClassVar[str] = "detection"
    methods: ClassVar[tuple[str, ...] | None] = DETECTION_METHODS
    # The backbone's last stage: one (N, C, h, w) map per forward (an FPN's outputs are a dict).
    presets: ClassVar[tuple[tuple[str, str], ...]] = (
        ("fasterrcnn_mobilenet", "backbone.body.16"),
        ("fasterrcnn", "backbone.body.layer4"),
        ("maskrcnn", "backbone.body.layer4"),
        ("keypointrcnn", "backbone.body.layer4"),
        ("retinanet", "backbone.body.layer4"),
        ("fcos", "backbone.body.layer4"),
        ("ssdlite", "backbone.features.1"),
        ("ssd", "backbone.features"),
    )

    def check_output(self, output: Any, spec: ModelSpec) -> None:
        if not (
            isinstance(output, list | tuple)
            and len(output) == 1
            and isinstance(output[0], dict)
            and all(isinstance(output[0].get(k), torch.Tensor) for k in DETECTION_KEYS)
        ):
            raise ManifestError(
                'task = "detection" needs a model that answers one dict per image with boxes, '
                f"scores and labels (torchvision's detectors do); this one returns "
                f"{type(output).__name__}"
            )
        boxes = output[0]["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ManifestError(f"the detector's boxes have shape {tuple(boxes.shape)}, not (K, 4)")
        labels = output[0]["labels"]
        if labels.numel() and int(labels.max()) >= spec.num_classes:
            raise ManifestError(
                f"the detector answers label {int(labels.max())} but num_classes is "
                f"{spec.num_classes}"
            )


DETECTION_KEYS = ("boxes", "scores", "labels")
