"""Hand-checkable cases for app.cam.faithfulness."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from app.cam.faithfulness import (
    auc,
    confidence_change,
    confidence_drop,
    confidence_increase,
    deletion_auc,
    deletion_curve,
    explanation_map_inputs,
    gaussian_blur,
    insertion_auc,
    insertion_curve,
    perturbation_curve,
    randomization_check,
    randomize_model,
    rankdata,
    spearman_correlation,
)
from app.cam.task_targets import DetectionSimilarity


class CountingModel(nn.Module):
    """Two-class model with p(class 0) = (k + 1) / (n + 2), k = kept pixels in a region.

    A pixel is "kept" when it is non-zero. Logits are log(k + 1) and log(n - k + 1), so
    the softmax gives exactly (k + 1) / (n + 2) for class 0.
    """

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = ((x[:, 0] != 0) & self.region).flatten(1).sum(dim=1).float()
        n = float(self.region.sum())
        return torch.stack([torch.log(kept + 1), torch.log(n - kept + 1)], dim=1)


def _ramp_map(h: int, w: int) -> torch.Tensor:
    """Saliency decreasing in row-major order: pixel 0 most salient."""
    return torch.arange(h * w, 0, -1, dtype=torch.float32).view(1, h, w)


def test_deletion_and_insertion_curves_count_pixels() -> None:
    model = CountingModel(torch.ones(4, 4))
    image = torch.ones(1, 1, 4, 4)
    sal = _ramp_map(4, 4)
    f, p = deletion_curve(model, image, sal, [0], n_steps=4, baseline="zeros")
    assert torch.allclose(f, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # kept pixels 16, 12, 8, 4, 0 -> p = (k + 1) / 18
    assert torch.allclose(p, torch.tensor([[17.0, 13.0, 9.0, 5.0, 1.0]]) / 18)
    # trapezoid: 0.25 * ((17 + 1) / 2 + 13 + 9 + 5) / 18 = 0.5
    assert torch.allclose(auc(f, p), torch.tensor([0.5]))
    f, p = insertion_curve(model, image, sal, [0], n_steps=4, baseline=torch.zeros(1))
    assert torch.allclose(p, torch.tensor([[1.0, 5.0, 9.0, 13.0, 17.0]]) / 18)


def test_order_matters_good_map_beats_reversed_map() -> None:
    region = torch.zeros(4, 4)
    region[:2, :2] = 1  # the model only looks at the top-left 2x2 block
    model = CountingModel(region)
    image = torch.ones(1, 1, 4, 4)
    good = region[None] + 0.01 * _ramp_map(4, 4) / 16  # block first, ties by ramp
    bad = -good
    # good: block deleted in the first step -> p = [5, 1, 1, 1, 1] / 6 -> AUC 0.25
    assert torch.allclose(deletion_auc(model, image, good, [0], n_steps=4), torch.tensor([0.25]))
    # bad: block deleted last -> p = [5, 5, 5, 5, 1] / 6 -> AUC 0.75
    assert torch.allclose(deletion_auc(model, image, bad, [0], n_steps=4), torch.tensor([0.75]))
    zeros = torch.zeros(1)
    ins_good = insertion_auc(model, image, good, [0], n_steps=4, baseline=zeros)
    ins_bad = insertion_auc(model, image, bad, [0], n_steps=4, baseline=zeros)
    assert torch.allclose(ins_good, torch.tensor([0.75]))
    assert torch.allclose(ins_bad, torch.tensor([0.25]))


def test_low_resolution_map_is_upsampled_and_batches_are_chunked() -> None:
    region = torch.zeros(4, 4)
    region[:2, :2] = 1
    model = CountingModel(region)
    images = torch.ones(3, 1, 4, 4)
    low = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(3, 2, 2)  # points at the block
    cls = torch.tensor([0, 1, 0])
    f1, p1 = deletion_curve(model, images, low, cls, n_steps=4, batch_size=2)
    f2, p2 = deletion_curve(model, images, low, cls, n_steps=4, batch_size=100)
    assert torch.equal(p1, p2)
    expected0 = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0]) / 6
    assert torch.allclose(p1[0], expected0)
    assert torch.allclose(p1[1], 1 - expected0)  # class 1 probability
    assert torch.allclose(p1[2], expected0)


def test_insertion_default_baseline_is_blur() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randn(2, 3, 16, 16)
    sal = torch.rand(2, 4, 4)
    _, p = insertion_curve(model, images, sal, [1, 2], n_steps=20)
    assert p.shape == (2, 21)
    with torch.no_grad():
        p_blur = torch.softmax(model(gaussian_blur(images)), dim=1)[[0, 1], [1, 2]]
        p_full = torch.softmax(model(images), dim=1)[[0, 1], [1, 2]]
    assert torch.allclose(p[:, 0], p_blur, atol=1e-6)
    assert torch.allclose(p[:, -1], p_full, atol=1e-6)
    _, d = deletion_curve(model, images, sal, [1, 2], n_steps=20)
    assert torch.allclose(d[:, 0], p_full, atol=1e-6)


def test_gaussian_blur_preserves_constants_and_mass() -> None:
    x = torch.full((1, 3, 9, 9), 2.5)
    assert torch.allclose(gaussian_blur(x), x)
    with pytest.raises(ValueError):
        gaussian_blur(x, kernel_size=4)


def test_perturbation_rejects_bad_arguments() -> None:
    model = CountingModel(torch.ones(2, 2))
    with pytest.raises(ValueError):
        deletion_curve(model, torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2), [0], n_steps=0)
    with pytest.raises(ValueError):
        deletion_curve(model, torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2), [0], baseline="x")


class BoxDetector(nn.Module):
    """A detector's output from a one-channel image: one detection per image, the box of the
    kept (non-zero) pixels of ``region``, its score the share of the region kept."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.bool())

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        found = []
        for image in x:
            kept = (image[0] != 0) & self.region
            share = kept.sum().float() / self.region.sum()
            rows, cols = torch.nonzero(kept if kept.any() else self.region, as_tuple=True)
            box = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
            found.append({"boxes": box[None], "labels": torch.tensor([1]), "scores": share[None]})
        return found


def test_curves_follow_targets_as_they_follow_classes() -> None:
    """``targets=`` in place of ``class_idx``: a target that reads the class's probability
    draws the same curves; a detection's similarity draws a detector's."""
    model = CountingModel(torch.ones(4, 4))
    images = torch.ones(2, 1, 4, 4)
    sal = torch.cat([_ramp_map(4, 4), _ramp_map(4, 4).flip(-1)])
    for mode in ("deletion", "insertion"):
        by_class = perturbation_curve(model, images, sal, [0, 1], mode, 4, "zeros")
        by_target = perturbation_curve(
            model,
            images,
            sal,
            None,
            mode,
            4,
            "zeros",
            targets=[lambda o: o.softmax(-1)[0], lambda o: o.softmax(-1)[1]],
        )
        assert torch.equal(by_class[0], by_target[0])
        assert torch.allclose(by_class[1], by_target[1], atol=1e-6)
    assert torch.allclose(
        deletion_auc(model, images, sal, None, 4, targets=lambda o: o.softmax(-1)[0]),
        deletion_auc(model, images, sal, [0, 0], 4),
        atol=1e-6,
    )
    region = torch.zeros(4, 4)
    region[:2] = 1
    detector = BoxDetector(region)
    target = DetectionSimilarity(torch.tensor([0.0, 0.0, 4.0, 2.0]), 1)
    image = torch.ones(1, 1, 4, 4)
    f, p = deletion_curve(detector, image, _ramp_map(4, 4), None, 4, targets=target)
    # The map deletes the region's top row first, then its bottom row: the box of what is left
    # is half the region (IoU 1/2), then gone; the score falls with it.
    assert torch.allclose(p, torch.tensor([[1.0, 0.25, 0.0, 0.0, 0.0]]))
    f, p = insertion_curve(
        detector, image, _ramp_map(4, 4), None, 4, torch.zeros(1), targets=target
    )
    assert torch.allclose(p, torch.tensor([[0.0, 0.25, 1.0, 1.0, 1.0]]))


def test_curves_take_classes_or_targets_not_both() -> None:
    model = CountingModel(torch.ones(2, 2))
    image, sal = torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="either class_idx"):
        deletion_curve(model, image, sal, None)
    with pytest.raises(ValueError, match="either class_idx"):
        deletion_curve(model, image, sal, [0], targets=lambda o: o[0])
    with pytest.raises(ValueError, match="2 callables but the batch has 1"):
        deletion_curve(model, image, sal, None, targets=[lambda o: o[0]] * 2)
    with pytest.raises(ValueError, match="scalar tensor"):
        deletion_curve(model, image, sal, None, targets=lambda o: o)


def test_rankdata_averages_ties() -> None:
    x = torch.tensor([[10.0, 20.0, 20.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    expected = torch.tensor([[2.0, 3.5, 3.5, 1.0], [2.5, 2.5, 2.5, 2.5]], dtype=torch.float64)
    assert torch.equal(rankdata(x), expected)
    assert torch.equal(rankdata(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([3.0, 1, 2]).double())


def test_spearman_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]] * 3)
    b = torch.tensor([[2.0, 1.0, 4.0, 3.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0], [5.0, 4, 3, 2, 1]])
    # row 0: d = [-1, 1, -1, 1, 0], 1 - 6 * 4 / (5 * 24) = 0.8
    rho = spearman_correlation(a, b)
    assert torch.allclose(rho, torch.tensor([0.8, 1.0, -1.0]))


def test_spearman_with_ties_and_constant_map() -> None:
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # ranks a = [1, 2.5, 2.5, 4] (mean 2.5): centred [-1.5, 0, 0, 1.5]
    # ranks b = [1, 2, 3, 4]: centred [-1.5, -0.5, 0.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert torch.allclose(spearman_correlation(a, b), torch.tensor([math.sqrt(0.9)]))
    # maps of shape (N, h, w) are flattened; a constant map gets 0
    const = torch.ones(1, 2, 2)
    assert spearman_correlation(const, b.view(1, 2, 2)).item() == 0.0
    with pytest.raises(ValueError):
        spearman_correlation(torch.ones(1, 4), torch.ones(1, 5))


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(123)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 3, padding=1)
    ).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_randomize_model_is_seeded_and_leaves_original_alone() -> None:
    model = _tiny_model()
    before = [p.clone() for p in model.parameters()]
    state = torch.get_rng_state()
    r1 = randomize_model(model, seed=7)
    r2 = randomize_model(model, seed=7)
    r3 = randomize_model(model, seed=8)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    for p, q, s in zip(r1.parameters(), r2.parameters(), r3.parameters(), strict=True):
        assert torch.equal(p, q)
        assert not torch.equal(p, s)
        assert not p.requires_grad
    assert not r1.training
    only_top = randomize_model(model, seed=7, modules=["2"])
    assert torch.equal(only_top[0].weight, model[0].weight)
    assert not torch.equal(only_top[2].weight, model[2].weight)
    with pytest.raises(ValueError):
        randomize_model(model, modules=["nope"])


def test_randomization_check_input_only_map_fails_sanity() -> None:
    """A map that ignores the model (like an edge detector) correlates perfectly."""
    model = _tiny_model()
    images = torch.rand(4, 1, 6, 6)

    def input_map(m: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x[:, 0].abs()

    out = randomization_check(model, input_map, images, [0, 0, 0, 0], mode="full", seed=0)
    assert list(out) == ["full"]
    assert torch.allclose(out["full"], torch.ones(4))


def test_randomization_check_model_map_and_cascading_order() -> None:
    model = _tiny_model()
    torch.manual_seed(0)
    images = torch.rand(4, 1, 6, 6)

    def first_layer_map(m: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return m[0](x).sum(dim=1)  # depends only on the bottom conv

    full = randomization_check(model, first_layer_map, images, [0] * 4, mode="full", seed=1)
    assert (full["full"].abs() < 0.99).all()
    casc = randomization_check(model, first_layer_map, images, [0] * 4, mode="cascading", seed=1)
    assert list(casc) == ["2", "0"]  # top (output side) first
    # resetting only the top conv leaves the map unchanged; resetting the bottom one too
    # changes it
    assert torch.allclose(casc["2"], torch.ones(4))
    assert (casc["0"].abs() < 0.99).all()
    again = randomization_check(model, first_layer_map, images, [0] * 4, mode="cascading", seed=1)
    assert torch.equal(again["0"], casc["0"])
    with pytest.raises(ValueError):
        randomization_check(model, first_layer_map, images, [0] * 4, mode="layer")


# ------------------------------------------------------------------ ROAD


def test_imputation_reproduces_a_linear_image_and_keeps_the_kept_pixels() -> None:
    from app.cam.faithfulness import noisy_linear_imputation

    rows, cols = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    image = (0.1 * cols - 0.05 * rows)[None, None].expand(2, 3, 40, 40).contiguous()
    removed = torch.zeros(2, 40, 40, dtype=torch.bool)
    removed[0, 5:30, 8:35] = True  # one large hole
    removed[1, 1:-1, 1:-1] = torch.rand(38, 38, generator=torch.Generator().manual_seed(0)) < 0.8
    # Inside the image a linear image is the weighted mean of its eight neighbours, so it is the
    # exact solution when no border pixel is removed (at the border the mean of the neighbours
    # that exist is not linear, and the fill is not the line).
    exact = noisy_linear_imputation(image, removed, 0.0, tolerance=1e-7, max_iterations=4000)
    assert (exact - image).abs().max() < 1e-3
    # The default solve stops at a relative residual of 1e-3: within 1 % of the image's range.
    filled = noisy_linear_imputation(image, removed, noise_std=0.0)
    assert (filled - image).abs().max() < 0.01 * float(image.max() - image.min())
    noisy = noisy_linear_imputation(image, removed, 0.5, torch.Generator().manual_seed(1))
    kept = ~removed[:, None].expand_as(image)
    assert torch.equal(noisy[kept], image[kept])
    assert (noisy - image)[~kept].std() > 0.3
    again = noisy_linear_imputation(image, removed, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)


class RegionMean(nn.Module):
    """p(class 0) rises with the mean of channel 0 over a region: ``logit_0 = 8 * mean - 4``."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = (x[:, 0] * self.region).flatten(1).sum(1) / self.region.sum()
        return torch.stack([8 * mean - 4, torch.zeros_like(mean)], dim=1)


def test_road_ranks_a_map_of_the_evidence_above_its_reverse() -> None:
    from app.cam.faithfulness import ROAD_PERCENTILES, road_curve, road_inputs

    region = torch.zeros(24, 24)
    region[8:16, 8:16] = 1
    model = RegionMean(region)
    image = region.expand(1, 3, 24, 24).clone()
    good = region[None] + 0.01 * torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(2))
    bad = -good
    morf_good = road_curve(model, image, good, [0], "morf", noise_std=0.0)
    morf_bad = road_curve(model, image, bad, [0], "morf", noise_std=0.0)
    lerf_good = road_curve(model, image, good, [0], "lerf", noise_std=0.0)
    lerf_bad = road_curve(model, image, bad, [0], "lerf", noise_std=0.0)
    assert morf_good.shape == (1, len(ROAD_PERCENTILES))
    assert morf_good.mean() < morf_bad.mean() and lerf_good.mean() > lerf_bad.mean()
    # At 20 % (115 of 576 pixels) the good map's MoRF removed the whole 8x8 region: the fill
    # comes from the zeros around it, so the evidence is gone; the reverse map removed zeros.
    assert morf_good[0, 1] < 0.05 < 0.95 < morf_bad[0, 1]
    by_target = road_curve(
        model, image, good, None, "morf", noise_std=0.0, targets=lambda o: o.softmax(-1)[0]
    )
    assert torch.allclose(by_target, morf_good, atol=1e-6)
    inputs = road_inputs(image, good, "lerf", (10, 50))
    assert inputs.shape == (1, 2, 3, 24, 24)
    with pytest.raises(ValueError, match="order"):
        road_inputs(image, good, "middle")
    with pytest.raises(ValueError, match="percentiles"):
        road_inputs(image, good, "morf", (0, 50))


def test_confidence_change_by_hand() -> None:
    """The image times its map: a map on the region keeps the class's probability, its
    complement deletes the region (p from 5/6 to 1/6: a drop of 4/5)."""
    region = torch.zeros(4, 4)
    region[:2, :2] = 1
    model = CountingModel(region)
    images = torch.ones(3, 1, 4, 4)
    maps = torch.stack([region * 3 + 1, 1 - region, torch.full((4, 4), 2.0)])  # raw, any scale
    before, after = confidence_change(model, images, maps, [0, 0, 0])
    assert torch.allclose(before, torch.full((3,), 5 / 6))
    assert torch.allclose(after, torch.tensor([5 / 6, 1 / 6, 1 / 6]))  # a flat map keeps nothing
    assert torch.allclose(confidence_drop(before, after), torch.tensor([0.0, 0.8, 0.8]))
    assert confidence_increase(before, after).tolist() == [False, False, False]
    by_target = confidence_change(
        model, images, maps, None, targets=lambda o: o.softmax(-1)[0], batch_size=1
    )
    assert torch.allclose(by_target[0], before) and torch.allclose(by_target[1], after)
    # Class 1 counts what was removed: deleting the region raises it.
    up = confidence_change(model, images[1:2], maps[1:2], [1])
    assert confidence_increase(*up).tolist() == [True] and confidence_drop(*up).item() == 0.0


def test_explanation_map_inputs_scale_and_upsample_the_map() -> None:
    images = torch.full((1, 2, 4, 4), 2.0)
    low = torch.tensor([[[0.0, 4.0], [4.0, 4.0]]])  # 2 x 2, max 4: scaled to [0, 1]
    inputs = explanation_map_inputs(images, low[:, None])  # (N, 1, h, w) taken too
    expected = 2.0 * torch.nn.functional.interpolate(
        (low / 4)[:, None], size=(4, 4), mode="bilinear", align_corners=False
    )
    assert torch.allclose(inputs, expected.expand(1, 2, 4, 4))
    volume = explanation_map_inputs(torch.ones(1, 1, 2, 4, 4), torch.rand(1, 1, 2, 2))
    assert volume.shape == (1, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="same batch size"):
        explanation_map_inputs(images, torch.rand(2, 2, 2))
    assert confidence_drop(torch.tensor([0.0]), torch.tensor([0.5])).item() == 0.0
