"""Classification: the model answers (N, classes) logits."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from app.cam import METHODS
from app.models.manifest import ManifestError, ModelSpec
from app.models.tasks.base import ModelTask


class Classification(ModelTask):
    name: ClassVar[str] = "classification"

    def method_reason(self, method: str) -> str | None:
        cls = METHODS.get(method)
        if cls is not None and cls.explains_detections:
            return (
                f"{method} explains a detector's boxes (it compares the detections of masked "
                "images); a classification model has none. For a black-box map of a class use "
                "ScoreCAM or AblationCAM"
            )
        return None

    def check_output(self, output: Any, spec: ModelSpec) -> None:
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != (1, spec.num_classes):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ManifestError(
                f"the model returns {got} for one image but num_classes is {spec.num_classes}"
            )
        finite = torch.isfinite(output)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ManifestError(
                f"the probe forward (on the warm-up input) gave {bad} of {finite.numel()} logits "
                "that are NaN or infinite; the weights are broken (check the checkpoint)"
            )
