"""Swin transformers (app.cam.hierarchical): channels-last grids, preset target layers, Grad-CAM
against a direct computation, LeGrad's refusal; tiny random-weight torchvision and timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.cam import ChannelsLast, GradCAM, LeGrad, ScoreCAM, hierarchical_target
from app.cam.hierarchical import channels_last_layers, is_hierarchical, layout_transform
from tests.fixtures_models import build_tiny, build_tiny_swin, build_tiny_timm_swin

SHAPE = (3, 32, 32)


@pytest.fixture
def swin() -> nn.Module:
    torch.manual_seed(0)
    return build_tiny_swin().eval()


@pytest.fixture
def timm_swin() -> nn.Module:
    torch.manual_seed(0)
    return build_tiny_timm_swin().eval()


def test_channels_last_lays_a_grid_out_channels_first() -> None:
    grid = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # (N, H, W, C)
    assert torch.equal(ChannelsLast()(grid), grid.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"channels-last grid \(N, H, W, C\)"):
        ChannelsLast()(torch.zeros(2, 16, 8))


def test_the_preset_layer_is_the_final_norm(swin: nn.Module, timm_swin: nn.Module) -> None:
    for model in (swin, timm_swin):
        target = hierarchical_target(model)
        assert target.layer_name == "norm" and target.layer is model.norm
        assert isinstance(target.reshape_transform, ChannelsLast)
    with pytest.raises(ValueError, match="not a recognised hierarchical transformer"):
        hierarchical_target(build_tiny())


def test_channels_last_layers_are_the_trunk(swin: nn.Module, timm_swin: nn.Module) -> None:
    layers = channels_last_layers(swin)
    assert {"features", "features.0", "features.3", "norm"} <= layers
    assert not {"features.0.0", "permute", "avgpool", "head"} & layers  # 0.0: the patch conv
    timm_layers = channels_last_layers(timm_swin)
    assert {"patch_embed", "layers.1", "norm"} <= timm_layers
    assert not any(name.startswith("head") for name in timm_layers)
    assert "patch_embed.proj" not in timm_layers
    assert channels_last_layers(build_tiny()) == frozenset() and not is_hierarchical(build_tiny())


def test_layout_transform_refuses_a_mix(swin: nn.Module) -> None:
    last = channels_last_layers(swin)
    assert layout_transform(last, ["layer"]) is None
    assert isinstance(layout_transform(last, ["norm", "features.3"]), ChannelsLast)
    with pytest.raises(ValueError, match="separate requests"):
        layout_transform(last, ["norm", "permute"])


def _direct_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]):
    """ReLU(sum_c mean_hw(dS/dA) A) with A the layer's (N, H, W, C) output, written out."""
    kept: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().requires_grad_(True)
        kept.append(out)
        return out

    handle = layer.register_forward_hook(keep)
    scores = model(x)
    handle.remove()
    (a,) = kept
    (grad,) = torch.autograd.grad(scores[torch.arange(len(x)), classes].sum(), a)
    weights = grad.mean(dim=(1, 2), keepdim=True)  # (N, 1, 1, C)
    return torch.relu((weights * a).sum(dim=3)).detach()


@pytest.mark.parametrize("which", ["torchvision", "timm"])
def test_gradcam_on_a_swin_is_the_direct_computation(
    swin: nn.Module, timm_swin: nn.Module, which: str
) -> None:
    model = swin if which == "torchvision" else timm_swin
    torch.manual_seed(1)
    x = torch.randn(2, *SHAPE)
    classes = [0, 2]
    target = hierarchical_target(model)
    expected = _direct_gradcam(model, target.layer, x, classes)
    with GradCAM(
        model, target.layer, input_shape=SHAPE, reshape_transform=target.reshape_transform
    ) as extractor:
        (got,) = extractor(classes, model(x), normalized=False)
    assert got.shape == (2, 4, 4)  # the last stage's grid (32 / 4 / 2)
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_final_norm_read_channels_last_is_torchvisions_permuted_output(
    swin: nn.Module,
) -> None:
    torch.manual_seed(2)
    x = torch.randn(1, *SHAPE)
    with GradCAM(swin, "norm", input_shape=SHAPE, reshape_transform=ChannelsLast()) as norm:
        (via_norm,) = norm([1], swin(x))
    with GradCAM(swin, "permute", input_shape=SHAPE) as permute:
        (via_permute,) = permute([1], swin(x))
    assert torch.allclose(via_norm, via_permute, atol=1e-6)


def test_an_earlier_stage_and_the_smoothing_options_work(timm_swin: nn.Module) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, *SHAPE)
    with GradCAM(
        timm_swin, "layers.0", input_shape=SHAPE, reshape_transform=ChannelsLast()
    ) as extractor:
        (cam,) = extractor([1], timm_swin(x), aug_smooth=True, eigen_smooth=True)
    assert cam.shape == (1, 8, 8) and float(cam.max()) == 1.0
    with (
        torch.no_grad(),
        ScoreCAM(timm_swin, "norm", input_shape=SHAPE, reshape_transform=ChannelsLast()) as score,
    ):
        (masked,) = score([1], timm_swin(x))
    assert masked.shape == (1, 4, 4)


def test_legrad_says_it_does_not_apply_to_a_swin(swin: nn.Module, timm_swin: nn.Module) -> None:
    # Swin attends within shifted windows (no nn.MultiheadAttention over all tokens).
    for model in (swin, timm_swin):
        reason = LeGrad.unavailable_reason(model, "norm", SHAPE)
        assert reason is not None and "Vision Transformer" in reason


def test_a_channels_last_model_without_a_final_norm_is_refused_clearly() -> None:
    class Grid(nn.Module):
        output_fmt = "NHWC"

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Identity()
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.stem(x.permute(0, 2, 3, 1)).mean(dim=(1, 2)))

    model = Grid()
    assert is_hierarchical(model) and channels_last_layers(model) == {"stem"}
    with pytest.raises(ValueError, match="no final norm"):
        hierarchical_target(model)


@pytest.mark.parametrize("which", ["torchvision", "timm"])
@pytest.mark.parametrize("layer", [None, "norm"])
def test_a_swin_without_a_transform_is_read_channels_last(
    swin: nn.Module, timm_swin: nn.Module, which: str, layer: str | None
) -> None:
    """Automatic or by name, a Swin's (N, H, W, C) final norm was read as (N, C, H, W): timm's
    Swin gave maps of shape (N, W, C) = (1, 4, 16) (swin_tiny at 224 px: (1, 7, 768)). It now
    gets ChannelsLast() itself, and the map of hierarchical_target's preset."""
    model = swin if which == "torchvision" else timm_swin
    torch.manual_seed(4)
    x = torch.randn(2, *SHAPE)
    target = hierarchical_target(model)
    with GradCAM(model, layer, input_shape=SHAPE) as extractor:
        (got,) = extractor([0, 2], model(x))
    assert extractor.target_names == ["norm"]
    with GradCAM(
        model, target.layer, input_shape=SHAPE, reshape_transform=target.reshape_transform
    ) as extractor:
        (want,) = extractor([0, 2], model(x))
    assert got.shape == (2, 4, 4)
    torch.testing.assert_close(got, want)


def test_a_mix_of_layouts_in_one_extractor_is_refused(timm_swin: nn.Module) -> None:
    with pytest.raises(ValueError, match="channels-first maps: use one extractor for each"):
        GradCAM(timm_swin, ["patch_embed.proj", "norm"], input_shape=SHAPE)
    assert not any(m._forward_hooks for m in timm_swin.modules())
