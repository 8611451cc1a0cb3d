"""The Vision Transformer helper: CAM methods on token-shaped layers in two lines."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from app.cam import METHODS, GradCAM, TokensToGrid, vit_target


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    return model


@pytest.mark.parametrize(
    "name",
    [
        "GradCAM",
        "GradCAMpp",
        "XGradCAM",
        "LayerCAM",
        "ScoreCAM",
        "HiResCAM",
        "EigenCAM",
        "AblationCAM",
    ],
)
def test_methods_run_on_torchvision_vit(vit, name):
    target = vit_target(vit)
    assert target.layer_name == "encoder.layers.encoder_layer_1.ln_1"
    extractor = METHODS[name](
        vit, target.layer, input_shape=(3, 32, 32), reshape_transform=target.reshape_transform
    )
    with extractor:
        context = torch.enable_grad() if extractor.requires_grad else torch.inference_mode()
        with context:
            scores = vit(torch.randn(2, 3, 32, 32))
        maps = extractor([1, 3], scores)[0]
    assert maps.shape == (2, 4, 4)
    assert torch.isfinite(maps).all()
    assert maps.amax(dim=(1, 2)).gt(0).all()  # the class score does depend on these tokens


def test_tokens_to_grid_drops_prefix_tokens():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    grid = TokensToGrid(prefix_tokens=2)(tokens)
    assert grid.shape == (2, 3, 2, 2)
    torch.testing.assert_close(grid[0, :, 0, 0], tokens[0, 2])
    with pytest.raises(ValueError, match="grid"):
        TokensToGrid(prefix_tokens=1)(tokens)


class TimmLike(nn.Module):
    """The attributes a timm ViT exposes: blocks[i].norm1, num_prefix_tokens, patch_embed."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, 4)
        self.patch_embed.grid_size = (2, 3)
        self.num_prefix_tokens = 2
        self.prefix = nn.Parameter(torch.randn(1, 2, 8))
        block = nn.Module()
        block.norm1 = nn.LayerNorm(8)
        block.mix = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([block])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], 1)
        block = self.blocks[0]
        h = block.norm1(t)
        t = t + block.mix(h.mean(1, keepdim=True) + h)
        return self.head(t[:, 0] + t[:, 2:].mean(1))


def test_timm_style_vit():
    torch.manual_seed(0)
    model = TimmLike().eval()
    target = vit_target(model)
    assert target.layer_name == "blocks.0.norm1"
    assert target.reshape_transform.prefix_tokens == 2
    with GradCAM(
        model, target.layer, input_shape=(3, 8, 12), reshape_transform=target.reshape_transform
    ) as extractor:
        maps = extractor(0, model(torch.randn(1, 3, 8, 12)))[0]
    assert maps.shape == (1, 2, 3)


def test_not_a_vit():
    with pytest.raises(ValueError, match="not a recognised Vision Transformer"):
        vit_target(nn.Sequential(nn.Linear(2, 2)))


#: Methods whose maps are read from the target layers' grid (LeGrad reads tokens, FullGrad,
#: D-RISE and Guided Backpropagation no layer; CAM and DFF refuse the ViT's head first).
GRID_METHODS = [
    n
    for n, cls in METHODS.items()
    if cls.takes_layers
    and cls.hooks_layers
    and not cls.reads_head
    and n not in ("LeGrad", "GuidedBackprop")
]
OPTIONS = {
    "SmoothGradCAMpp": {"num_samples": 2, "seed": 0},
    "SSCAM": {"num_samples": 2, "seed": 0},
    "ISCAM": {"num_samples": 2},
}


@pytest.mark.parametrize("name", GRID_METHODS)
def test_a_vits_token_layer_without_a_transform_is_laid_on_its_grid(vit, name):
    """A ViT block's (N, tokens, dim) output hooked with no reshape_transform was read as
    channels over a 1-D grid: GradCAM gave maps of shape (N, dim), EigenCAM too, silently.
    On a recognised ViT its tokens are laid on their grid as vit_target's transform lays them:
    the same maps as with that transform given."""
    layer = "encoder.layers.encoder_layer_1.ln_1"
    layers = [layer, "encoder.layers.encoder_layer_0.ln_1"] if name == "RefineCAM" else layer
    x = torch.randn(2, 3, 32, 32)
    maps = []
    for transform in (None, vit_target(vit).reshape_transform):
        options = {**OPTIONS.get(name, {}), "reshape_transform": transform}
        with METHODS[name](vit, layers, input_shape=(3, 32, 32), **options) as extractor:
            maps.append(extractor([1, 3], vit(x)))
    assert not any(m._forward_hooks for m in vit.modules())
    automatic, given = maps
    # the 4x4 patch grid (GuidedGradCAM's at the input's size), not (2, 16)
    assert automatic[0].shape == given[0].shape and automatic[0].ndim == 3
    if name != "RandomCAM":  # noise drawn at each call
        for a, b in zip(automatic, given, strict=True):
            torch.testing.assert_close(a, b)


class _Tokens(nn.Module):
    """A transformer that is no recognised ViT: tokens of its own making."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # type: ignore[no-untyped-def]
        tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


def test_tokens_of_another_transformer_without_a_transform_name_vit_target():
    model = _Tokens().eval()
    with METHODS["GradCAM"](model, "mix", input_shape=(3, 32, 32)) as extractor:
        scores = model(torch.randn(2, 3, 32, 32))
        with pytest.raises(ValueError, match=r"gives \(2, 16, 8\): tokens.*vit_target\(model\)"):
            extractor([1, 2], scores)
    assert not any(m._forward_hooks for m in model.modules())


def test_guided_backprop_reads_no_layer_so_a_token_layer_will_do(vit):
    x = torch.randn(2, 3, 32, 32)
    maps = []
    for layer in ("encoder.layers.encoder_layer_1.ln_1", "conv_proj"):
        with METHODS["GuidedBackprop"](vit, layer, input_shape=(3, 32, 32)) as extractor:
            maps.append(extractor([1, 3], vit(x))[0])
    torch.testing.assert_close(maps[0], maps[1])
