"""Segmentation: the model answers (N, classes, H, W) logits; torchvision's segmenters answer a
dict whose ``out`` holds them, which a forward hook on the module hands on alone."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from app.models.manifest import ManifestError, ModelSpec
from app.models.tasks.base import ModelTask
from app.models.tasks.detection import MAP_METHODS

#: D-RISE compares detections, which a segmenter has none of.
SEGMENTATION_METHODS = MAP_METHODS


def _main_output(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    return output


class Segmentation(ModelTask):
    name: ClassVar[str] = "segmentation"
    methods: ClassVar[tuple[str, ...] | None] = SEGMENTATION_METHODS
    presets: ClassVar[tuple[tuple[str, str], ...]] = (
        ("deeplabv3_mobilenet", "backbone.16"),
        ("deeplabv3", "backbone.layer4"),
        ("fcn", "backbone.layer4"),
        ("lraspp", "backbone.16"),
    )

    def prepare(self, module: nn.Module, spec: ModelSpec) -> None:
        # The auxiliary head's map and the dict are no use to a target: keep ``out`` only.
        module.register_forward_hook(_main_output)

    def check_output(self, output: Any, spec: ModelSpec) -> None:
        if (
            not isinstance(output, torch.Tensor)
            or output.ndim != 4
            or tuple(output.shape[:2]) != (1, spec.num_classes)
        ):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ManifestError(
                f'task = "segmentation" needs (1, {spec.num_classes}, H, W) logits for one '
                f"image (or a dict whose out holds them); the model returns {got}"
            )
