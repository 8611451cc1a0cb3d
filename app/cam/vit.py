"""Make CAM methods work on Vision Transformers.

A transformer block emits tokens (N, prefix + H*W, dim). ``vit_target`` picks a layer whose patch
tokens the class score still depends on (the first norm of the last block: the class token attends
to them there, whereas the last block's output patch tokens no longer reach the head) and builds
the ``reshape_transform`` that drops the prefix tokens (class, distillation, registers) and lays
the patch tokens out as a grid (N, dim, H, W).

    target = vit_target(model)
    with GradCAM(model, target.layer, reshape_transform=target.reshape_transform) as cam: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


class TokensToGrid:
    """Drop ``prefix_tokens`` leading tokens and reshape (N, T, D) tokens to (N, D, H, W)."""

    def __init__(self, prefix_tokens: int = 1, grid_size: tuple[int, int] | None = None) -> None:
        self.prefix_tokens = prefix_tokens
        self.grid_size = grid_size

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ValueError(
                f"Expected tokens of shape (N, tokens, dim), got {tuple(tokens.shape)}."
            )
        patches = tokens[:, self.prefix_tokens :]
        count = patches.shape[1]
        if self.grid_size is not None:
            height, width = self.grid_size
        else:
            height = width = math.isqrt(count)
        if height * width != count:
            raise ValueError(
                f"{count} patch tokens do not form a {height}x{width} grid: pass grid_size."
            )
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a layer's output of ``shape`` is tokens this transform lays on its grid."""
        if len(shape) != 3:
            return False
        count = shape[1] - self.prefix_tokens
        if self.grid_size is not None:
            return count == self.grid_size[0] * self.grid_size[1]
        return count > 0 and math.isqrt(count) ** 2 == count

    def grid_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """The (N, dim, H, W) shape that tokens of ``shape`` (N, tokens, dim) are laid out as."""
        height, width = self.grid_size or (math.isqrt(shape[1] - self.prefix_tokens),) * 2
        return (shape[0], shape[2], height, width)

    def __repr__(self) -> str:
        return f"TokensToGrid(prefix_tokens={self.prefix_tokens}, grid_size={self.grid_size})"


@dataclass(frozen=True)
class ViTTarget:
    """The layer to hook on a ViT (or a hierarchical transformer, ``app.cam.hierarchical``) and
    the transform that makes its tokens a (N, C, H, W) grid."""

    layer: nn.Module
    layer_name: str
    reshape_transform: Callable[[Tensor], Tensor]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _torchvision_target(model: Any) -> ViTTarget:
    block = model.encoder.layers[-1]
    grid = model.image_size // model.patch_size
    layer = block.ln_1
    return ViTTarget(layer, _name_of(model, layer), TokensToGrid(1, (grid, grid)))


def _timm_target(model: Any) -> ViTTarget:
    block = model.blocks[-1]
    layer = block.norm1
    prefix = int(
        getattr(model, "num_prefix_tokens", 1 + int(getattr(model, "dist_token", None) is not None))
    )
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    grid_size = (int(grid[0]), int(grid[1])) if grid is not None else None
    return ViTTarget(layer, _name_of(model, layer), TokensToGrid(prefix, grid_size))


def vit_target(model: nn.Module) -> ViTTarget:
    """The target layer and reshape transform for torchvision's ``VisionTransformer`` or a
    timm-style ViT/DeiT (``model.blocks[i].norm1``, ``num_prefix_tokens``, ``patch_embed``)."""
    if hasattr(model, "encoder") and hasattr(model, "patch_size") and hasattr(model, "image_size"):
        return _torchvision_target(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return _timm_target(model)
    raise ValueError(
        f"{type(model).__name__} is not a recognised Vision Transformer (torchvision "
        "VisionTransformer or timm-style ViT). Hook a block yourself and pass "
        "reshape_transform=TokensToGrid(prefix_tokens, grid_size)."
    )


def token_grid(model: nn.Module) -> TokensToGrid | None:
    """The transform that lays a recognised ViT's tokens on their grid (``vit_target``'s), or
    None for any other model: used when a ViT's token layer is hooked without a transform."""
    try:
        transform = vit_target(model).reshape_transform
    except (ValueError, AttributeError, TypeError):
        return None
    return transform if isinstance(transform, TokensToGrid) else None
