"""eigen_smooth and aug_smooth (app.cam.smoothing): each formula against a direct computation on a
tiny model, the options' declaration on every method, their cost and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from app.cam import (
    METHODS,
    EigenCAM,
    FinerCAM,
    GradCAM,
    GradCAMpp,
    LeGrad,
    RefineCAM,
    ScoreCAM,
    normalize_maps,
)
from app.cam.options import AUG_SMOOTH, AUG_VARIANTS, EIGEN_SMOOTH
from app.cam.smoothing import augmented, flip_refusal, merged, principal_map

# ---------------------------------------------------------------------------- declarations


def test_every_map_method_declares_the_smoothing_options_once() -> None:
    # Their maps are no weighted sum of channels: a component of the weighted activations is
    # already the map (Eigen), or there are no channel weights (the rest).
    no_eigen = (
        "EigenCAM",
        "EigenGradCAM",
        "LeGrad",
        "GuidedBackprop",
        "GuidedGradCAM",
        "DFF",
        "FullGrad",
        "KPCACAM",
        "FEM",
        "RandomCAM",
        "DRISE",
    )
    for name, cls in METHODS.items():
        # DFF: each image's own concepts, six variants' do not average; DRISE: a flipped image's
        # detections no longer match the target box.
        takes_aug = name not in ("DFF", "DRISE")
        assert (cls.option("aug_smooth") is AUG_SMOOTH) is takes_aug, name
        assert cls.option_names.count("aug_smooth") == int(takes_aug)
        expected = name not in no_eigen
        assert (cls.option("eigen_smooth") is EIGEN_SMOOTH) is expected, name
    assert EIGEN_SMOOTH.default is False and AUG_SMOOTH.default is False
    assert EIGEN_SMOOTH.at == "call" and EIGEN_SMOOTH.describe()["type"] == "boolean"


def test_a_bool_option_takes_only_bools() -> None:
    assert EIGEN_SMOOTH.check(True) is True and EIGEN_SMOOTH.check(False) is False
    for wrong in (1, 0, "true", None, 1.0):
        with pytest.raises(TypeError, match="eigen_smooth must be true or false"):
            EIGEN_SMOOTH.check(wrong)


def test_a_method_with_its_own_maps_takes_no_eigen_smooth() -> None:
    # Derived from the class: LeGrad computes its maps itself (no weighted activations).
    assert LeGrad.eigen_smoothable is False and GradCAM.eigen_smoothable is True
    assert EigenCAM.eigen_smoothable is False  # already a first principal component


def test_aug_smooth_counts_six_times_the_forwards() -> None:
    shapes = [(1, 4, 5, 6)]
    assert GradCAM.extra_forwards(shapes, {}, 2).total == 0
    assert GradCAM.extra_forwards(shapes, {"aug_smooth": True}, 2).total == 12
    assert ScoreCAM.extra_forwards(shapes, {}, 2).total == 8
    # 6 variants of 2 images: their own forward, then 4 masked forwards each.
    assert ScoreCAM.extra_forwards(shapes, {"aug_smooth": True}, 2).total == 60
    assert GradCAM.extra_forwards(shapes, {"eigen_smooth": True}, 2).total == 0


# ---------------------------------------------------------------------------- eigen_smooth


def _direct_principal(weighted: np.ndarray) -> np.ndarray:
    """ReLU of the centred projection on the first right singular vector, signed to agree with
    the channel sum, for one image's (K, H, W) weighted activations."""
    k = weighted.shape[0]
    matrix = weighted.reshape(k, -1).T  # (P, K)
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    total = matrix.sum(axis=1)
    if (projection * (total - total.mean())).sum() < 0:
        projection = -projection
    return np.maximum(projection, 0).reshape(weighted.shape[1:])


def test_eigen_smooth_is_the_first_component_of_gradcams_weighted_activations(
    quadratic: nn.Module,
) -> None:
    torch.manual_seed(1)
    a = torch.randn(3, 4, 5, 6)
    classes = [0, 2, 1]
    with GradCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        scores = quadratic(a)
        (got,) = extractor(classes, scores, normalized=False, eigen_smooth=True)
    weight = quadratic.weight.detach()
    for i, c in enumerate(classes):
        grad = weight[c] * a[i]  # dS_c/dA for S_c = 1/2 sum W_c A^2
        w = grad.mean(dim=(1, 2))
        weighted = (w[:, None, None] * a[i]).double().numpy()
        np.testing.assert_allclose(got[i].numpy(), _direct_principal(weighted), atol=1e-5)


def test_eigen_smooth_of_score_cam_uses_its_weights(
    tiny_net: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    seen: list[list[Tensor]] = []
    own = ScoreCAM._weights_many

    def recorded(self, *args):  # type: ignore[no-untyped-def]
        per_objective = own(self, *args)
        seen.extend(per_objective)
        return per_objective

    monkeypatch.setattr(ScoreCAM, "_weights_many", recorded)
    with torch.no_grad(), ScoreCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        scores = tiny_net(x)
        activations = extractor._activations_for_use()
        (smooth,) = extractor([1, 2], scores, normalized=False, eigen_smooth=True)
    ((weights,),) = seen
    for i in range(2):
        weighted = (weights[i].reshape(-1, 1, 1) * activations[0][i]).double().numpy()
        np.testing.assert_allclose(smooth[i].numpy(), _direct_principal(weighted), atol=1e-5)


def test_eigen_smooth_is_batched_image_by_image() -> None:
    torch.manual_seed(3)
    weighted = torch.randn(4, 6, 5, 7)
    batched = principal_map(weighted)
    for i in range(4):
        assert torch.allclose(batched[i], principal_map(weighted[i : i + 1])[0], atol=1e-6)
        np.testing.assert_allclose(
            batched[i].numpy(), _direct_principal(weighted[i].double().numpy()), atol=1e-5
        )


def test_eigen_smooth_of_a_rank_one_map_keeps_its_shape() -> None:
    # X_k = c_k * m: the first component is m itself (centred), whatever the c_k signs.
    torch.manual_seed(4)
    m = torch.rand(1, 5, 5)
    c = torch.tensor([2.0, 0.5, 1.0])
    got = principal_map(c[None, :, None, None] * m[:, None])
    expected = torch.relu(m - m.mean()) * torch.linalg.norm(c)
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------- aug_smooth


def test_augmented_and_merged_undo_the_flips() -> None:
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    variants = augmented(x)
    assert variants.shape == (12, 3, 2, 4)
    assert torch.equal(variants[2:4], x * 1.0)
    assert torch.allclose(variants[6:8], x.flip(-1) * 0.9)
    # Maps that follow their variants (here: the variants' first channel) merge back to the mean
    # of the scales, on the original orientation.
    maps = variants[:, 0]
    assert torch.allclose(merged(maps, 2), x[:, 0] * 1.0, atol=1e-6)


def _direct_aug(model: nn.Module, cls: type, x: Tensor, classes: list[int], normalized: bool):
    maps = []
    for flip in (False, True):
        for scale in (0.9, 1.0, 1.1):
            variant = (x.flip(-1) if flip else x) * scale
            with cls(model, "feat", input_shape=tuple(x.shape[1:])) as extractor:
                with torch.enable_grad() if cls.requires_grad else torch.no_grad():
                    (cam,) = extractor(classes, model(variant), normalized=normalized)
            maps.append(cam.flip(-1) if flip else cam)
    mean = torch.stack(maps).mean(dim=0)
    return normalize_maps(mean) if normalized else mean


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("cls", [GradCAM, ScoreCAM])
def test_aug_smooth_is_the_mean_over_flips_and_scales(
    tiny_net: nn.Module, cls: type, normalized: bool
) -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 12)
    classes = [1, 2]
    expected = _direct_aug(tiny_net, cls, x, classes, normalized)
    batches: list[int] = []
    with cls(tiny_net, "feat", input_shape=(3, 16, 12)) as extractor:
        with torch.enable_grad() if cls.requires_grad else torch.no_grad():
            scores = tiny_net(x)
            handle = tiny_net.register_forward_pre_hook(lambda _m, a: batches.append(len(a[0])))
            (got,) = extractor(classes, scores, normalized=normalized, aug_smooth=True)
            handle.remove()
    assert torch.allclose(got, expected, atol=1e-5)
    assert batches[0] == AUG_VARIANTS * 2  # the variants run as one batch


def test_aug_smooth_leaves_the_callers_forward_as_it_was(tiny_net: nn.Module) -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 3, 16, 16)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        scores = tiny_net(x)
        (before,) = extractor([0, 1], scores, retain_graph=True)
        (smooth,) = extractor([0, 1], scores, aug_smooth=True, retain_graph=True)
        (after,) = extractor([0, 1], scores)
    assert torch.equal(before, after) and not torch.allclose(before, smooth)
    assert extractor._input is None  # hooks removed on exit, the state forgotten


def test_both_options_together_smooth_each_variant(quadratic: nn.Module) -> None:
    torch.manual_seed(7)
    a = torch.randn(2, 4, 5, 6)
    with GradCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        (got,) = extractor([0, 1], quadratic(a), aug_smooth=True, eigen_smooth=True)
    assert got.shape == (2, 5, 6) and float(got.max()) == 1.0


def test_composite_methods_hand_the_options_to_their_base(tiny_net: nn.Module) -> None:
    torch.manual_seed(8)
    x = torch.randn(1, 3, 16, 16)
    with FinerCAM(tiny_net, "feat", input_shape=(3, 16, 16), gamma=0.0) as finer:
        (fine,) = finer([2], tiny_net(x), aug_smooth=True)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as grad:
        (plain,) = grad([2], tiny_net(x), aug_smooth=True)
    assert torch.allclose(fine, plain, atol=1e-6)  # gamma=0: the base's own map
    with RefineCAM(tiny_net, ["conv", "feat"], input_shape=(3, 16, 16)) as refine:
        (product,) = refine([2], tiny_net(x), eigen_smooth=True)
    with GradCAMpp(tiny_net, ["conv", "feat"], input_shape=(3, 16, 16)) as base:
        maps = base([2], tiny_net(x), eigen_smooth=True)
    assert torch.allclose(product, normalize_maps(maps[0] * maps[1]), atol=1e-6)


# ---------------------------------------------------------------------------- refusals


def test_a_method_refuses_an_option_it_does_not_take(tiny_net: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), EigenCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as extractor:
        tiny_net(x)
        with pytest.raises(ValueError, match="EigenCAM does not take eigen_smooth"):
            extractor(eigen_smooth=True)
        with pytest.raises(TypeError, match="aug_smooth must be True or False"):
            extractor(aug_smooth="yes")


def test_aug_smooth_refuses_what_it_cannot_flip() -> None:
    assert flip_refusal({"image": torch.zeros(1)}) is not None
    assert "not images" in str(flip_refusal(torch.zeros(2, 5)))
    assert "not images" in str(flip_refusal(torch.zeros(2, 3, 4, 4, dtype=torch.long)))
    assert flip_refusal(torch.zeros(2, 3, 4, 4), map_ndim=3) is None
    # A fixed input size flips fine: a flip keeps the size.
    assert flip_refusal(torch.zeros(2, 3, 7, 7)) is None
    assert "spatial dimension" in str(flip_refusal(torch.zeros(2, 3, 4, 4), map_ndim=2))


def test_aug_smooth_refuses_maps_off_the_inputs_grid(tiny_net: nn.Module) -> None:
    # A reshape_transform that flattens the grid into one axis: the map no longer lies on the
    # input's width, so the flipped variants' maps cannot be flipped back.
    x = torch.randn(1, 3, 16, 16)
    with GradCAM(
        tiny_net, "feat", input_shape=(3, 16, 16), reshape_transform=lambda t: t.flatten(2)
    ) as extractor:
        scores = tiny_net(x)
        assert extractor([1], scores, retain_graph=True)[0].shape == (1, 64)
        with pytest.raises(ValueError, match="aug_smooth flips the maps back"):
            extractor([1], scores, aug_smooth=True)


def test_aug_smooth_needs_the_recorded_input(tiny_net: nn.Module) -> None:
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16), enable_hooks=False) as extractor:
        extractor.enable_hooks()
        with pytest.raises(RuntimeError, match="No activation recorded"):
            extractor([1], None, aug_smooth=True)
        scores = tiny_net(torch.randn(1, 3, 16, 16))
        extractor._input = None  # a forward whose input was no tensor (a dict, say)
        with pytest.raises(ValueError, match="aug_smooth: GradCAM recorded no model input"):
            extractor([1], scores, aug_smooth=True)


def test_eigen_smooth_lasts_one_call(quadratic: nn.Module) -> None:
    torch.manual_seed(9)
    a = torch.randn(2, 4, 5, 6)
    with GradCAM(quadratic, "feat", input_shape=(4, 5, 6)) as extractor:
        scores = quadratic(a)
        (plain,) = extractor([0, 1], scores, retain_graph=True)
        (smooth,) = extractor([0, 1], scores, eigen_smooth=True, retain_graph=True)
        (again,) = extractor([0, 1], scores)
    assert not torch.allclose(plain, smooth) and torch.equal(plain, again)
    assert extractor._eigen_smooth is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_eigen_smooth_of_a_batch_with_a_non_finite_image(bad: float) -> None:
    """The batch's SVD failed for every image; the bad image's values count as 0."""
    weighted = torch.rand(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    weighted[0, :, 1, 1] = bad
    maps = principal_map(weighted)
    torch.testing.assert_close(maps[1:], principal_map(weighted[1:]))
