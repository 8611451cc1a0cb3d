"""Faithfulness of explanations by Average Drop and Increase in Confidence.

Both are defined in the Grad-CAM++ paper (Chattopadhyay et al., WACV 2018, section 5.1): the input
is multiplied by the upsampled map and the class probability is read again
(``app.cam.faithfulness.confidence_change`` gives the same per sample, for any target).
  Average Drop = mean_i max(0, Y_i - O_i) / Y_i;  Increase in Confidence = mean_i [O_i > Y_i],
with Y_i the probability of the explained class on the image and O_i on the masked image. Both are
reported as fractions in [0, 1] (multiply by 100 for the paper's percentages).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from app.cam.core import _CAM, hooks_silenced
from app.cam.faithfulness import confidence_drop, confidence_increase, explanation_map_inputs


class ClassificationMetric:
    """Accumulates Average Drop and Increase in Confidence of one extractor over batches.

    Args:
        cam_extractor: the extractor to evaluate (its model is the one it hooks).
        logits_fn: turns the model's output into class probabilities (default: softmax).
    """

    def __init__(
        self, cam_extractor: _CAM, logits_fn: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        self.cam_extractor = cam_extractor
        self.logits_fn = logits_fn or (lambda logits: torch.softmax(logits, dim=-1))
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.drop = 0.0
        self.increase = 0.0
        self.total = 0

    def _explain(
        self, input_tensor: Tensor, class_idx: int | list[int] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        extractor = self.cam_extractor
        model = extractor.model
        grad_context = torch.enable_grad() if extractor.requires_grad else torch.inference_mode()
        with grad_context:
            scores = model(input_tensor)
        probs = self.logits_fn(scores.detach().float())
        if class_idx is None:
            classes = probs.argmax(dim=1)
        else:
            classes = extractor._class_tensor(class_idx, input_tensor.shape[0], probs.device)
        cams = extractor(classes.tolist(), scores)
        cam = extractor.fuse_cams(cams)
        return probs, classes, cam

    def update(self, input_tensor: Tensor, class_idx: int | list[int] | None = None) -> None:
        """Add a batch: explain ``class_idx`` (default: the predicted class) of each sample."""
        probs, classes, cam = self._explain(input_tensor, class_idx)
        with torch.inference_mode(), hooks_silenced():
            masked_probs = self.logits_fn(
                self.cam_extractor.model(explanation_map_inputs(input_tensor, cam)).float()
            )
        picked = classes[:, None].to(probs.device)
        before = probs.gather(1, picked)[:, 0]
        after = masked_probs.gather(1, picked.to(masked_probs.device))[:, 0].to(before.device)
        self.drop += float(confidence_drop(before, after).sum())
        self.increase += float(confidence_increase(before, after).sum())
        self.total += int(input_tensor.shape[0])

    def summary(self) -> dict[str, float]:
        """``{"avg_drop": ..., "conf_increase": ...}`` as fractions over every sample seen."""
        if self.total == 0:
            raise RuntimeError("ClassificationMetric.summary() before any update().")
        return {"avg_drop": self.drop / self.total, "conf_increase": self.increase / self.total}
