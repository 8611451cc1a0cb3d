"""The models of ``shapes-segment`` and ``shapes-detect``: a tiny fully convolutional segmenter
of the synthetic shape scenes (background + 8 classes), and a detector built on it.

The detector answers as torchvision's detectors do (one dict of ``boxes``, ``scores``,
``labels`` per image): one box per class the segmenter finds in at least ``min_pixels`` pixels,
bounding that class's pixels, scored by the class's mean probability over them. The score is a
differentiable function of the segmenter's logits, so a box's class score can be explained.
Scenes hold shapes of different classes, so a class is one shape there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.models.zoo.shapes_dataset import CLASSES

NUM_CLASSES = len(CLASSES) + 1
"""Background (0) and the shapes' classes (1..8)."""


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShapesSegmenter(nn.Module):
    """conv stages at 1/2, 1/4 and 1/8 of the input, a 1x1 head, logits upsampled to the input:
    (N, classes, H, W)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(_block(3, width, 2), _block(width, width, 1))
        self.layer1 = nn.Sequential(_block(width, 2 * width, 2), _block(2 * width, 2 * width, 1))
        self.layer2 = nn.Sequential(
            _block(2 * width, 4 * width, 2), _block(4 * width, 4 * width, 1)
        )
        self.head = nn.Conv2d(4 * width + 2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.layer1(self.stem(x))
        deep = self.layer2(mid)
        up = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([up, mid], dim=1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ShapesDetector(nn.Module):
    """One box per class found by the segmenter (see the module's docstring)."""

    def __init__(
        self, num_classes: int = NUM_CLASSES, width: int = 16, min_pixels: int = 12
    ) -> None:
        super().__init__()
        self.segmenter = ShapesSegmenter(num_classes, width)
        self.min_pixels = min_pixels

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        logits = self.segmenter(x)
        probs = logits.softmax(1)
        found = []
        for image in range(x.shape[0]):
            labels = probs[image].detach().argmax(0)
            boxes, scores, classes = [], [], []
            for c in range(1, probs.shape[1]):
                inside = labels == c
                if int(inside.sum()) < self.min_pixels:
                    continue
                rows = torch.nonzero(inside.any(1)).flatten()
                cols = torch.nonzero(inside.any(0)).flatten()
                boxes.append(
                    torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).to(x.dtype)
                )
                scores.append((probs[image, c] * inside).sum() / inside.sum())
                classes.append(c)
            found.append(
                {
                    "boxes": torch.stack(boxes) if boxes else x.new_zeros((0, 4)),
                    "scores": torch.stack(scores) if scores else x.new_zeros((0,)),
                    "labels": torch.tensor(classes, dtype=torch.int64, device=x.device),
                }
            )
        return found


def build_segmenter(num_classes: int = NUM_CLASSES, width: int = 16) -> nn.Module:
    return ShapesSegmenter(num_classes, width)


def build_detector(num_classes: int = NUM_CLASSES, width: int = 16) -> nn.Module:
    return ShapesDetector(num_classes, width)
