"""The shapes segmenter's shape, and the detector built on it: one box per class found, bounding
its pixels, scored by its mean probability there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from app.cam.task_targets import box_iou
from app.models.loading import load_model
from app.models.manifest import parse_manifest
from app.models.zoo.shapes_tasks import NUM_CLASSES, ShapesDetector, build_segmenter
from app.pipeline.decoding import Upload
from app.pipeline.tasks import PIPELINES
from app.pipeline.tasks.common import decode_whole


def test_the_segmenter_answers_logits_at_the_input_size() -> None:
    out = build_segmenter()(torch.zeros(2, 3, 40, 56))
    assert out.shape == (2, NUM_CLASSES, 40, 56)


class _Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1)


def test_the_detector_boxes_each_class_found() -> None:
    logits = torch.zeros(1, 3, 16, 16)
    logits[0, 0] = 5.0
    logits[0, 1, 2:6, 3:9] = 10.0  # 24 pixels of class 1
    logits[0, 2, 10:12, 0:2] = 10.0  # 4 pixels of class 2: under min_pixels
    detector = ShapesDetector(num_classes=3)
    detector.segmenter = _Fixed(logits)  # type: ignore[assignment]
    (found,) = detector(torch.zeros(1, 3, 16, 16))
    assert found["boxes"].tolist() == [[3.0, 2.0, 9.0, 6.0]]
    assert found["labels"].tolist() == [1]
    expected = float(torch.softmax(torch.tensor([5.0, 10.0, 0.0]), 0)[1])
    assert float(found["scores"][0]) == pytest.approx(expected)


def test_a_scene_without_shapes_has_no_boxes() -> None:
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 0] = 1.0
    detector = ShapesDetector(num_classes=3)
    detector.segmenter = _Fixed(logits)  # type: ignore[assignment]
    (found,) = detector(torch.zeros(1, 3, 8, 8))
    assert found["boxes"].shape == (0, 4) and found["labels"].numel() == 0


ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["shapes-detect", "shapes-segment"])
def test_the_shipped_models_find_the_example_scenes_shapes(name: str) -> None:
    model = load_model(parse_manifest(ROOT / "model_store" / name), torch.device("cpu"))
    data = (ROOT / "examples" / "scenes" / "scene.png").read_bytes()
    decoded = decode_whole(Upload("scene.png", data), model.spec, 10**6)
    pipeline = PIPELINES[model.spec.task]
    answer = pipeline.answer(model, decoded, pipeline.forward(model, decoded), ())
    truth = {"hexagon": [50, 6, 96, 57], "ring": [5, 75, 62, 122]}
    if name == "shapes-detect":
        found = {d.label: d.box for d in answer["detections"]}
    else:
        found = {s.label: s.box for s in answer["segments"] if s.class_idx != 0}
    assert set(found) == set(truth)
    for label, box in truth.items():
        iou = float(
            box_iou(torch.tensor(box, dtype=torch.float32), torch.tensor([found[label]]))[0]
        )
        assert iou >= 0.7, (label, found[label])
