"""ClassificationMetric: Average Drop and Increase in Confidence by their definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.cam import CAM, ClassificationMetric, GradCAM


class PixelVote(nn.Module):
    """logits = [sum of channel 0, sum of channel 1]: the probability is known in closed form."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2) * 4)

    def forward(self, x):
        return self.fc(self.pool(self.feat(x)).flatten(1))


def _expected(model, x, mask_fn, classes):
    probs = torch.softmax(model(x), 1)
    masked = torch.softmax(model(x * mask_fn(x)), 1)
    y = probs[torch.arange(len(classes)), classes]
    o = masked[torch.arange(len(classes)), classes]
    return float((torch.relu(y - o) / y).mean()), float((o > y).float().mean())


@pytest.mark.parametrize("method", [CAM, GradCAM])
def test_summary_matches_definition(method):
    torch.manual_seed(0)
    model = PixelVote().eval()
    x = torch.rand(4, 2, 4, 4)
    x[:2, 0] += 1.0
    x[2:, 1] += 1.0
    metric = ClassificationMetric(method(model, "feat", input_shape=(2, 4, 4)))
    metric.update(x[:2])
    metric.update(x[2:])
    summary = metric.summary()
    with method(model, "feat", input_shape=(2, 4, 4)) as extractor:
        context = torch.enable_grad() if method.requires_grad else torch.inference_mode()
        with context:
            scores = model(x)
        classes = scores.argmax(1)
        cam = extractor(classes.tolist(), scores)[0]
    with torch.no_grad():
        drop, increase = _expected(model, x, lambda _: cam[:, None], classes)
    assert summary["avg_drop"] == pytest.approx(drop, abs=1e-6)
    assert summary["conf_increase"] == pytest.approx(increase, abs=1e-6)
    assert 0 <= summary["avg_drop"] <= 1


def test_explicit_class_and_reset():
    model = PixelVote().eval()
    metric = ClassificationMetric(CAM(model, "feat", input_shape=(2, 4, 4)))
    with pytest.raises(RuntimeError, match="before any update"):
        metric.summary()
    metric.update(torch.rand(3, 2, 4, 4), class_idx=1)
    assert metric.total == 3
    metric.reset()
    assert metric.total == 0


def test_custom_logits_fn():
    model = PixelVote().eval()
    metric = ClassificationMetric(
        CAM(model, "feat", input_shape=(2, 4, 4)), logits_fn=lambda s: torch.sigmoid(s)
    )
    metric.update(torch.rand(2, 2, 4, 4))
    assert set(metric.summary()) == {"avg_drop", "conf_increase"}
