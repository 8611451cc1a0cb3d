"""Ablation-CAM against its formula, on a model whose ablated scores the test writes down."""

from __future__ import annotations

import pytest
import torch

from app.cam import AblationCAM, GradCAM, TokensToGrid


def test_ablationcam_matches_the_formula(quadratic):
    # S_c = 1/2 sum W_c A^2, so zeroing channel k removes 1/2 sum_ij W_ck A_k^2 from S_c.
    a = torch.rand(2, 4, 5, 6) + 0.1
    classes = [2, 0]
    with AblationCAM(quadratic, "feat", input_shape=(4, 5, 6), batch_size=3) as extractor:
        with torch.inference_mode():
            scores = quadratic(a)
        raw = extractor(classes, scores, normalized=False)[0]
        rerun = extractor(classes, normalized=False)[0]  # scores may be left out
    w = quadratic.weight.detach()[classes].double()
    a64 = a.double()
    y = (0.5 * w * a64**2).sum((1, 2, 3))
    drop = (0.5 * w * a64**2).sum((2, 3))  # y_c - y_c^(k)
    weights = drop / y[:, None]
    expected = torch.relu((weights[:, :, None, None] * a64).sum(1))
    torch.testing.assert_close(raw.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rerun, raw)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_ablationcam_does_not_depend_on_batch_size(tiny_net, batch_size):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with AblationCAM(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=1) as reference:
        expected = reference([0, 1], tiny_net(x))[0]
    with AblationCAM(tiny_net, "feat", input_shape=(3, 16, 16), batch_size=batch_size) as cam:
        torch.testing.assert_close(cam([0, 1], tiny_net(x))[0], expected)


def test_ablationcam_leaves_other_extractors_and_the_model_alone(tiny_net):
    x = torch.randn(2, 3, 16, 16)
    with GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as grad:
        expected = grad([0, 1], tiny_net(x))[0]
    with (
        GradCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as grad,
        AblationCAM(tiny_net, "feat", input_shape=(3, 16, 16)) as ablation,
    ):
        scores = tiny_net(x)
        ablation([1, 1], scores)
        torch.testing.assert_close(grad([0, 1], scores)[0], expected)
    assert not tiny_net.feat._forward_hooks
    torch.testing.assert_close(tiny_net(x), scores)


def test_ablationcam_zeroes_the_channel_through_a_reshape_transform():
    class Tokens(torch.nn.Module):
        """Tokens (N, 1 + 4, 3): a class token and a 2x2 grid; the score is a weighted sum."""

        def __init__(self) -> None:
            super().__init__()
            self.feat = torch.nn.Identity()
            self.weight = torch.nn.Parameter(torch.randn(2, 5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.feat(x.flatten(2).transpose(1, 2))
            return torch.einsum("ntd,ctd->nc", tokens, self.weight)

    torch.manual_seed(0)
    model = Tokens()
    x = torch.rand(1, 3, 1, 5)
    transform = TokensToGrid(1, (2, 2))
    with AblationCAM(model, "feat", input_shape=(3, 1, 5), reshape_transform=transform) as cam:
        scores = model(x)
        raw = cam(1, scores, normalized=False)[0]
    tokens = x.flatten(2).transpose(1, 2)[0]  # (5, 3)
    w = model.weight.detach()[1]
    y = (tokens * w).sum()
    drop = (tokens[1:] * w[1:]).sum(0)  # channel k of the patch tokens only
    grid = tokens[1:].T.reshape(3, 2, 2)
    expected = torch.relu(((drop / y)[:, None, None] * grid).sum(0))
    torch.testing.assert_close(raw[0], expected, rtol=1e-5, atol=1e-6)


def test_the_fx_tail_gives_the_hooked_forwards_results():
    import torchvision

    from app.cam.tail import model_tail

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = {}
    for fast in (True, False):
        with AblationCAM(model, ["layer3", "layer4"], (3, 64, 64), fast_path=fast) as cam:
            with torch.inference_mode():
                scores = model(x)
            maps[fast] = cam([0, 3], scores, normalized=False)
            assert (cam._tails.get("layer4") is not None) == fast
    for fast_map, hooked_map in zip(maps[True], maps[False], strict=True):
        torch.testing.assert_close(fast_map, hooked_map, rtol=1e-4, atol=1e-5)
    # A skip connection goes around layer4.0.conv1: no tail, the hooked forward is used.
    assert model_tail(model, "layer4.0.conv1") is None
    assert model_tail(model, "layer4.0.relu") is None  # called twice per block


@pytest.mark.parametrize(("ratio", "kept"), [(0.5, 2), (0.3, 2), (0.01, 1), (1.0, 4)])
def test_ablation_ratio_ablates_the_channels_of_largest_mean_only(quadratic, ratio, kept):
    """The chosen channels keep the full run's weights; the others weigh 0."""
    a = torch.rand(2, 4, 5, 6) + 0.1
    a[0, 3] += 2.0  # sample 0: channel 3 has the largest mean
    classes = [2, 0]
    w = quadratic.weight.detach()[classes].double()
    a64 = a.double()
    y = (0.5 * w * a64**2).sum((1, 2, 3))
    weights = (0.5 * w * a64**2).sum((2, 3)) / y[:, None]
    top = a64.mean((2, 3)).topk(kept, dim=1).indices
    chosen = torch.zeros(2, 4, dtype=torch.bool).scatter_(1, top, True)
    assert bool(chosen[0, 3])
    expected = torch.relu((torch.where(chosen, weights, 0)[:, :, None, None] * a64).sum(1))
    with AblationCAM(
        quadratic, "feat", input_shape=(4, 5, 6), batch_size=3, ablation_ratio=ratio
    ) as extractor:
        done: list[tuple[int, int]] = []
        with torch.inference_mode():
            scores = quadratic(a)
        raw = extractor(
            classes, scores, normalized=False, progress=lambda d, t: done.append((d, t))
        )[0]
        torch.testing.assert_close(extractor.chosen_channels(a), chosen)
    # float32 y_c - y_c^(k) with a large channel: a few 1e-6 of rounding
    torch.testing.assert_close(raw.double(), expected, rtol=1e-4, atol=1e-5)
    assert done[-1] == (2 * kept, 2 * kept)  # only the chosen channels run
    shapes = [(2, 4, 5, 6)]
    assert AblationCAM.extra_forwards(shapes, {"ablation_ratio": ratio}, 2).total == 2 * kept


def test_ablation_ratio_is_checked(tiny_net):
    for bad in (0.0, 1.5, -1.0, True):
        with pytest.raises(ValueError, match=r"ablation_ratio must lie in \(0, 1\]"):
            AblationCAM(tiny_net, "feat", input_shape=(3, 16, 16), ablation_ratio=bad)
