"""Tiny seeded models and a helper that writes them into a model store folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from app.models.access import StoreAccess

FIXTURE_MODULE = "tests.fixtures_models"
"""The module of the test factories: the tests trust it (CAMSERVE_TRUSTED_MODULES, set by
tests/conftest.py for every Settings, and ``fixture_access`` for code that reads a store)."""


def fixture_access(store: Path) -> StoreAccess:
    """The rules of a test store: the fixture factories are trusted, nothing else is."""
    return StoreAccess(root=store, trusted_modules=(FIXTURE_MODULE,))


class TinyNet(nn.Module):
    """conv-relu-conv-relu, global average pooling, one Linear head: every CAM method applies."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGGLike(nn.Module):
    """Two Linear layers after a 2x2 pooling: CAM does not apply, gradient methods do."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(width * 4, 8), nn.ReLU(), nn.Linear(8, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_tiny(num_classes: int = 3, width: int = 4) -> nn.Module:
    return TinyNet(num_classes, width)


def build_vgg_like(num_classes: int = 3, width: int = 4) -> nn.Module:
    return VGGLike(num_classes, width)


def write_model(
    store: Path,
    name: str,
    model: nn.Module,
    *,
    architecture: str,
    num_classes: int,
    input_size: int,
    target_layers: list[str],
    kwargs: str = "",
    extra_cam: str = "",
    description: str = "test model",
) -> Path:
    """Save ``model``'s state_dict, labels and a manifest as ``store/name``."""
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    labels = "\n".join(f"{name}_class{i}" for i in range(num_classes))
    (folder / "labels.txt").write_text(labels + "\n")
    layers = ", ".join(f'"{layer}"' for layer in target_layers)
    (folder / "model.toml").write_text(
        f"""description = "{description}"

[model]
architecture = "{architecture}"
{kwargs}
weights = "weights.pt"
num_classes = {num_classes}
labels = "labels.txt"

[preprocess]
resize = {input_size}
crop = {input_size}
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
input_shape = [3, {input_size}, {input_size}]

[cam]
target_layers = [{layers}]
default_method = "GradCAM"
{extra_cam}
"""
    )
    return folder


def build_tiny_vit(num_classes: int = 3) -> nn.Module:
    """A two-block torchvision VisionTransformer on 32x32 images (a 4x4 patch grid)."""
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=num_classes,
    )


def write_tiny_vit(store: Path, name: str = "vit") -> None:
    """A served tiny ViT (seeded, with a head that is not zero) in ``store``/``name``."""
    torch.manual_seed(0)
    vit = build_tiny_vit()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    write_model(
        store,
        name,
        vit,
        architecture="tests.fixtures_models:build_tiny_vit",
        num_classes=3,
        input_size=32,
        target_layers=["encoder.layers.encoder_layer_1.ln_1"],
    )


def build_tiny_swin(num_classes: int = 3) -> nn.Module:
    """A two-stage torchvision SwinTransformer on 32x32 images: stages of 8x8 and 4x4 windows of
    tokens kept as (N, H, W, C) grids."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[2, 2],
        num_classes=num_classes,
    )


def build_tiny_timm_swin(num_classes: int = 3) -> nn.Module:
    """A two-stage timm Swin transformer on 32x32 images (random weights, no download)."""
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=2,
        num_classes=num_classes,
    )


def write_tiny_swin(store: Path, name: str = "swin", factory: str = "build_tiny_swin") -> None:
    """A served tiny Swin (seeded) in ``store``/``name``, with no target layers given: the
    service presets them."""
    torch.manual_seed(0)
    swin = globals()[factory]()
    write_model(
        store,
        name,
        swin,
        architecture=f"tests.fixtures_models:{factory}",
        num_classes=3,
        input_size=32,
        target_layers=[],
    )
