"""RefineCAM and FinerCAM against their definitions, built on the base methods' maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.cam import (
    FinerCAM,
    GradCAM,
    GradCAMpp,
    LayerCAM,
    RefineCAM,
    ScoreCAM,
    normalize_maps,
    resize_maps,
)

from .conftest import QuadraticHead


class TwoStages(nn.Module):
    """conv (8x8, ``a``) → conv (4x4, ``b``) → GAP → Linear: two layers of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean((2, 3)))


@pytest.mark.parametrize("base", [GradCAMpp, GradCAM, ScoreCAM])
def test_refinecam_is_the_product_of_normalised_resized_maps(base):
    torch.manual_seed(0)
    model = TwoStages().eval()
    x = torch.randn(2, 3, 16, 16)
    with base(model, ["a", "b"], input_shape=(3, 16, 16)) as extractor:
        a_map, b_map = extractor([0, 2], model(x))
    expected = normalize_maps(normalize_maps(a_map) * resize_maps(normalize_maps(b_map), (8, 8)))
    kwargs = {} if base is GradCAMpp else {"base_method": base}
    with RefineCAM(model, ["a", "b"], input_shape=(3, 16, 16), **kwargs) as refine:
        maps = refine([0, 2], model(x))
    assert len(maps) == 1 and maps[0].shape == (2, 8, 8)
    torch.testing.assert_close(maps[0], expected, rtol=1e-5, atol=1e-6)
    assert refine.requires_grad == base.requires_grad


def test_refinecam_checks_its_layers_and_base():
    model = TwoStages()
    with pytest.raises(ValueError, match="at least two"):
        RefineCAM(model, ["a"])
    with pytest.raises(ValueError, match="at least two"):
        RefineCAM(model, "a")
    for bad in (GradCAM(model, "a", input_shape=(3, 16, 16)), nn.Linear, "GradCAM", RefineCAM):
        with pytest.raises(TypeError, match="base_method"):
            RefineCAM(model, ["a", "b"], base_method=bad)


@pytest.fixture
def quadratic6() -> QuadraticHead:
    torch.manual_seed(0)
    return QuadraticHead(torch.randn(6, 4, 5, 6))


def _gradcam(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.relu((g.mean((2, 3))[:, :, None, None] * a).sum(1))


def test_finercam_explains_the_contrast_with_the_nearest_classes(quadratic6):
    a = torch.rand(2, 4, 5, 6) + 0.1
    classes = [1, 4]
    gamma = 0.6
    with FinerCAM(quadratic6, "feat", input_shape=(4, 5, 6), num_references=3) as extractor:
        scores = quadratic6(a)
        raw = extractor(classes, scores, normalized=False)[0]
    w = quadratic6.weight.detach()
    expected = []
    for i, c in enumerate(classes):
        distance = (scores[i].detach() - scores[i, c].detach()).abs()
        distance[c] = float("inf")
        refs = distance.argsort()[:3]
        contrast = w[c] - gamma * w[refs].mean(0)  # d(y_c - gamma mean y_d)/dA = (...) * A
        expected.append(_gradcam((contrast * a[i])[None], a[i : i + 1])[0])
    torch.testing.assert_close(raw, torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", [GradCAM, GradCAMpp, LayerCAM])
def test_finercam_with_gamma_zero_is_the_base_method(quadratic6, base):
    a = torch.rand(2, 4, 5, 6) + 0.1
    with base(quadratic6, "feat", input_shape=(4, 5, 6)) as extractor:
        expected = extractor([0, 5], quadratic6(a))[0]
    with FinerCAM(quadratic6, "feat", base, gamma=0, input_shape=(4, 5, 6)) as extractor:
        torch.testing.assert_close(extractor([0, 5], quadratic6(a))[0], expected)


def test_finercam_comparison_idx_forms(quadratic6):
    a = torch.rand(2, 4, 5, 6) + 0.1
    w = quadratic6.weight.detach()

    def expected(rows):
        maps = [
            _gradcam(((w[c] - 0.5 * w[r].mean(0)) * a[i])[None], a[i : i + 1])[0]
            for i, (c, r) in enumerate(zip([0, 1], rows, strict=True))
        ]
        return torch.stack(maps)

    with FinerCAM(quadratic6, "feat", gamma=0.5, input_shape=(4, 5, 6)) as extractor:
        for given, rows in [
            (3, [[3], [3]]),
            ([3, 4], [[3, 4], [3, 4]]),
            ([[2], [4, 5]], [[2], [4, 5]]),
            (torch.tensor([[2], [5]]), [[2], [5]]),
        ]:
            raw = extractor([0, 1], quadratic6(a), given, normalized=False)[0]
            torch.testing.assert_close(raw, expected(rows), rtol=1e-5, atol=1e-6)
        scores = quadratic6(a)
        for bad, error in [
            ([[2], [3], [4]], ValueError),
            ([0, 2], ValueError),  # holds the explained class of sample 0
            ([7], ValueError),
            ([[2], []], ValueError),
            (2.5, TypeError),
        ]:
            with pytest.raises(error):
                extractor([0, 1], scores, bad, retain_graph=True)


def test_finercam_checks(quadratic6):
    with pytest.raises(TypeError, match="base_method"):
        FinerCAM(quadratic6, "feat", ScoreCAM)
    with pytest.raises(ValueError, match="gamma"):
        FinerCAM(quadratic6, "feat", gamma=-1)
    with pytest.raises(ValueError, match="num_references"):
        FinerCAM(quadratic6, "feat", num_references=0)
    with FinerCAM(quadratic6, "feat", input_shape=(4, 5, 6)) as extractor:
        scores = quadratic6(torch.rand(1, 4, 5, 6))
        with pytest.raises(ValueError, match="targets"):
            extractor(scores=scores, targets=lambda o: o[0])
        with pytest.raises(ValueError, match="logits"):
            extractor(0)


def test_composite_repr_names_the_base_method_and_the_layers():
    model = TwoStages().eval()
    refine = RefineCAM(model, ["a", "b"], input_shape=(3, 16, 16))
    assert repr(refine) == "RefineCAM(base_method=GradCAMpp, target_layer=['a', 'b'])"
    finer = FinerCAM(model, "b", input_shape=(3, 16, 16))
    assert repr(finer) == "FinerCAM(base_method=GradCAM, target_layer=['b'])"


def test_refinecam_exposes_its_base_cam_whose_hooks_go_on_exit():
    model = TwoStages().eval()
    with RefineCAM(model, ["a", "b"], input_shape=(3, 16, 16)) as refine:
        base = refine.base_cam
        assert isinstance(base, GradCAMpp) and base.target_names == ["a", "b"]
        assert base._handles and model.a._forward_hooks and model.b._forward_hooks
        refine([0], model(torch.randn(1, 3, 16, 16)))
    assert base._handles == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
