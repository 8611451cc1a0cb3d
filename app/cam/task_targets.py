"""Targets (``app.cam.targets``) for detectors and segmenters: the score of one box, the logits
of one class over a region (and, for the faithfulness curves, scores in [0, 1]: a detection's
similarity, a region's mean class probability).

    with GradCAM(detector, "backbone.body.layer4") as cam:
        out = detector(x)                                    # [{boxes, scores, labels}]
        maps = cam(scores=out, targets=BoxScore(box, label))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The overlap above which a box of the explained pass is the box being explained.
MATCH_IOU = 0.5


def box_iou(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of one (4,) box with each of (K, 4) boxes, all x0, y0, x1, y1: (K,)."""
    x0 = torch.maximum(box[0], boxes[:, 0])
    y0 = torch.maximum(box[1], boxes[:, 1])
    x1 = torch.minimum(box[2], boxes[:, 2])
    y1 = torch.minimum(box[3], boxes[:, 3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter).clamp(min=1e-9)


class BoxScore:
    """The score of the detection of class ``label`` that overlaps ``box`` with IoU >= ``iou``
    (the best overlap when several do) in one image's detector output; 0 when none does (a
    masked or ablated input that loses the box scores nothing)."""

    def __init__(self, box: Tensor, label: int, iou: float = MATCH_IOU) -> None:
        self.box = box.detach().float()
        self.label = int(label)
        self.iou = iou

    def __call__(self, output: dict[str, Any]) -> Tensor:
        boxes, labels, scores = output["boxes"], output["labels"], output["scores"]
        if boxes.numel() == 0:
            return scores.sum() * 0
        overlap = box_iou(self.box.to(boxes.device), boxes.detach().float())
        match = (labels == self.label) & (overlap >= self.iou)
        if not bool(match.any()):
            return scores.sum() * 0
        best = torch.where(match, overlap, torch.full_like(overlap, -1.0)).argmax()
        return scores[best]


class RegionScore:
    """The sum of class ``class_idx``'s logits over ``region`` ((H, W) booleans at the output's
    resolution) in one image's (classes, H, W) segmentation output."""

    def __init__(self, class_idx: int, region: Tensor) -> None:
        self.class_idx = int(class_idx)
        self.region = region.bool()

    def __call__(self, output: Tensor) -> Tensor:
        region = self.region.to(output.device)
        return (output[self.class_idx] * region).sum()


class RegionProbability:
    """The mean probability (a softmax over the classes) of class ``class_idx`` over ``region``
    ((H, W) booleans at the output's resolution) in one image's (classes, H, W) segmentation
    output: a score in [0, 1], what a segmenter's faithfulness curves follow (``RegionScore``'s
    sum of logits is unbounded)."""

    def __init__(self, class_idx: int, region: Tensor) -> None:
        self.class_idx = int(class_idx)
        self.region = region.bool()

    def __call__(self, output: Tensor) -> Tensor:
        region = self.region.to(output.device)
        probability = output.float().softmax(0)[self.class_idx]
        return (probability * region).sum() / region.sum().clamp(min=1)


class DetectionSimilarity:
    """D-RISE's similarity (Petsiuk et al., CVPR 2021, eq. 3) of one image's detector output to
    a target detection: max over the output's detections j of
    IoU(L_t, L_j) x cos(P_t, P_j) x O_j; 0 when the output has no detection.

    ``P`` is a detection's class-probability vector: the output's ``probabilities`` (K,
    classes) when the detector answers them, else the one-hot vector of its label (torchvision's
    detectors answer a label and its score only; then the cosine is 1 for the same label and 0
    for another). ``O`` is the output's ``objectness`` when the detector answers it; without it,
    the detection's score stands in when ``P`` is one-hot (the only confidence such a detector
    gives, so that a mask that weakens the box weighs less), and 1 when ``P`` is the full vector
    (its score is one of ``P``'s entries already).
    """

    def __init__(self, box: Tensor, label: int, probabilities: Tensor | None = None) -> None:
        self.box = box.detach().float()
        self.label = int(label)
        self.probabilities = None if probabilities is None else probabilities.detach().float()

    @classmethod
    def of(cls, output: dict[str, Any], row: int) -> DetectionSimilarity:
        """The target of detection ``row`` of a detector's output."""
        probabilities = output.get("probabilities")
        return cls(
            output["boxes"][row],
            int(output["labels"][row]),
            None if probabilities is None else probabilities[row],
        )

    def __call__(self, output: dict[str, Any]) -> Tensor:
        boxes, labels, scores = output["boxes"], output["labels"], output["scores"]
        if boxes.numel() == 0:
            return scores.float().sum() * 0
        overlap = box_iou(self.box.to(boxes.device), boxes.detach().float())
        probabilities = output.get("probabilities")
        if self.probabilities is not None and probabilities is not None:
            target = self.probabilities.to(boxes.device)
            cosine = torch.nn.functional.cosine_similarity(
                probabilities.float(), target[None], dim=1
            )
            objectness = torch.ones_like(cosine)
        else:
            cosine = (labels == self.label).float()
            objectness = scores.float()
        if "objectness" in output:
            objectness = output["objectness"].float()
        return (overlap * cosine * objectness).max()
