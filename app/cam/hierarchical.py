"""Make CAM methods work on hierarchical transformers whose stages emit channels-last grids.

Swin transformers (torchvision's ``swin_t/s/b`` and ``swin_v2_*``, timm's ``swin_*``) keep their
tokens as a grid (N, H, W, C) from the patch embedding to the final norm; the head pools that
grid. ``ChannelsLast`` turns such an output into the (N, C, H, W) the extractors read, and
``hierarchical_target`` presets the final norm (the grid the head pools, as ``layer4`` is for a
ResNet) with that transform:

    target = hierarchical_target(model)
    with GradCAM(model, target.layer, reshape_transform=target.reshape_transform) as cam: ...

``channels_last_layers`` names every module of such a model whose output is channels-last, so
that a service can read their shapes as the extractors see them and refuse a mix of layouts.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor, nn

from app.cam.vit import ViTTarget, _name_of


class ChannelsLast:
    """(N, H, W, C) grids of tokens → (N, C, H, W)."""

    def __call__(self, grid: Tensor) -> Tensor:
        if grid.ndim != 4:
            raise ValueError(
                f"Expected a channels-last grid (N, H, W, C), got shape {tuple(grid.shape)}: "
                "hook a stage, a block or the final norm of the hierarchical transformer, not a "
                "module inside its window attention."
            )
        return grid.permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return "ChannelsLast()"


def _is_torchvision_swin(model: nn.Module) -> bool:
    # torchvision's SwinTransformer (v1 and v2): features (NHWC) -> norm -> permute -> avgpool.
    return all(hasattr(model, a) for a in ("features", "norm", "permute", "avgpool", "head"))


def _is_timm_channels_last(model: nn.Module) -> bool:
    # timm models that keep NHWC grids say so (Swin, Swin V2): the head pools NHWC.
    return getattr(model, "output_fmt", None) == "NHWC" and hasattr(model, "head")


def is_hierarchical(model: nn.Module) -> bool:
    """Whether ``model`` is a recognised channels-last hierarchical transformer."""
    return _is_torchvision_swin(model) or _is_timm_channels_last(model)


def channels_last_layers(model: nn.Module) -> frozenset[str]:
    """The modules of a hierarchical transformer whose outputs are channels-last grids (or
    windows of tokens inside them): its trunk and final norm but the patch embedding's
    convolution; empty for any other model."""
    if _is_torchvision_swin(model):
        trunk: tuple[Any, ...] = (model.features, model.norm)
    elif _is_timm_channels_last(model):
        head = model.head
        trunk = tuple(m for m in model.children() if m is not head)
    else:
        return frozenset()
    # The patch embedding's convolution still writes (N, C, H, W); the layers after it do not.
    inside = {id(m) for part in trunk for m in part.modules() if not isinstance(m, nn.Conv2d)}
    return frozenset(name for name, m in model.named_modules() if name and id(m) in inside)


def hierarchical_target(model: nn.Module) -> ViTTarget:
    """The final norm of a torchvision or timm Swin transformer (its (N, H, W, C) output is the
    grid the head pools) and the transform that lays it out as (N, C, H, W)."""
    if not is_hierarchical(model):
        raise ValueError(
            f"{type(model).__name__} is not a recognised hierarchical transformer (torchvision "
            "SwinTransformer, or a timm model with output_fmt 'NHWC'). Hook a stage yourself and "
            "pass reshape_transform=ChannelsLast() if its output is (N, H, W, C)."
        )
    layer = getattr(model, "norm", None)
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{type(model).__name__} has no final norm module to hook.")
    return ViTTarget(layer, _name_of(model, layer), ChannelsLast())


def layout_transform(
    channels_last: Collection[str],
    layers: Collection[str],
    fix: str = "explain them in separate requests",
) -> Any:
    """The transform for ``layers`` of a model whose ``channels_last`` modules emit (N, H, W, C):
    ``ChannelsLast()`` when all of them do, ``None`` when none does; a ``ValueError`` for a mix
    (one extractor reads every layer in one layout) that ends with ``fix``."""
    last = [layer for layer in layers if layer in channels_last]
    if not last:
        return None
    if len(last) == len(layers):
        return ChannelsLast()
    first = [layer for layer in layers if layer not in channels_last]
    raise ValueError(
        f"layers {', '.join(last)} give channels-last grids (N, H, W, C) and "
        f"{', '.join(first)} channels-first maps: {fix}."
    )
