"""BoxScore, RegionScore and RegionProbability: the score of a matched box, the logits and the
mean probability of a class over a region."""

from __future__ import annotations

import math

import pytest
import torch

from app.cam.task_targets import BoxScore, RegionProbability, RegionScore, box_iou


def _output() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20, 20, 30, 30]]),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
    }


def test_box_iou_by_hand() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [10, 10, 20, 20]])
    iou = box_iou(torch.tensor([0.0, 0.0, 10.0, 10.0]), boxes)
    assert torch.allclose(iou, torch.tensor([1.0, 50 / 150, 0.0]))


def test_box_score_takes_the_same_class_with_enough_overlap() -> None:
    # The box overlaps rows 0 (class 1) and 1 (class 2) alike: the class decides.
    assert float(BoxScore(torch.tensor([1.0, 1.0, 10.0, 10.0]), 2)(_output())) == pytest.approx(0.8)
    assert float(BoxScore(torch.tensor([1.0, 1.0, 10.0, 10.0]), 1)(_output())) == pytest.approx(0.9)
    assert float(BoxScore(torch.tensor([21.0, 21.0, 30.0, 30.0]), 1)(_output())) == pytest.approx(
        0.7
    )


def test_box_score_is_zero_without_a_match() -> None:
    assert float(BoxScore(torch.tensor([0.0, 0.0, 4.0, 4.0]), 1)(_output())) == 0.0  # IoU 0.16
    assert float(BoxScore(torch.tensor([20.0, 20.0, 30.0, 30.0]), 2)(_output())) == pytest.approx(
        0.0
    )
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}
    assert float(BoxScore(torch.tensor([0.0, 0.0, 4.0, 4.0]), 1)(empty)) == 0.0


def test_box_score_carries_the_gradient_of_the_matched_score() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7], requires_grad=True)
    output = {**_output(), "scores": scores}
    BoxScore(torch.tensor([20.0, 20.0, 30.0, 30.0]), 1)(output).backward()
    assert scores.grad is not None
    assert scores.grad.tolist() == [0.0, 0.0, 1.0]


def test_region_score_sums_the_class_logits_inside() -> None:
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    region = torch.zeros(3, 4, dtype=torch.bool)
    region[0, :2] = True
    region[2, 3] = True
    assert float(RegionScore(1, region)(logits)) == 12 + 13 + 23
    assert float(RegionScore(0, region)(logits)) == 0 + 1 + 11


def test_region_probability_is_the_mean_class_probability_inside() -> None:
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])  # (2, 2, 2)
    region = torch.tensor([[True, True], [True, False]])
    # class 1 per pixel: 1/2, e/(1+e), 1/(1+e^2); the fourth pixel is outside.
    expected = (0.5 + math.e / (1 + math.e) + 1 / (1 + math.e**2)) / 3
    assert float(RegionProbability(1, region)(logits)) == pytest.approx(expected, abs=1e-6)
    both = float(RegionProbability(0, region)(logits)) + float(RegionProbability(1, region)(logits))
    assert both == pytest.approx(1.0, abs=1e-6)
