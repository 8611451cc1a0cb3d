"""Overlay a class activation map on the image it explains.

The fast path works on 8-bit levels: the map is resized once, straight to the picture's size,
quantised to 256 levels, coloured through a 256-entry palette and blended with one rounding.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import Tensor

from app.cam.colormaps import colormap_lut

MaskLike = Image.Image | Tensor | np.ndarray


def _mask_array(mask: MaskLike) -> np.ndarray:
    """Any 2D map (with leading singleton axes, e.g. (1, 1, h, w)) -> float32 (h, w) array."""
    if isinstance(mask, Tensor):
        values = mask.detach().float().cpu().numpy()
    elif isinstance(mask, Image.Image):
        values = np.asarray(mask.convert("F"), dtype=np.float32)
        if mask.mode in ("L", "P", "RGB", "RGBA", "I;16"):
            values = values / (65535.0 if mask.mode == "I;16" else 255.0)
    else:
        values = np.asarray(mask, dtype=np.float32)
    # Only leading axes go: a 1-pixel-high map of a thin image is still a 2D map.
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"The mask must be a single 2D map, got shape {tuple(values.shape)}.")
    return np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)


def mask_levels(mask: MaskLike, size: tuple[int, int]) -> np.ndarray:
    """A map with values in [0, 1] resized (bilinear) to ``size`` (width, height): uint8 levels.

    Pillow's single-threaded C code, not torch: rendering runs beside model passes, and torch's
    thread pool, shared with them, made this 20x slower under load (measured)."""
    picture = Image.fromarray(np.ascontiguousarray(_mask_array(mask)), mode="F")
    target = (int(size[0]), int(size[1]))
    if picture.size != target:
        picture = picture.resize(target, Image.Resampling.BILINEAR)
    # 255 v + 0.5, truncated and clipped to 0..255 by the conversion: round to the nearest level.
    return np.asarray(picture.point(lambda v: v * 255 + 0.5).convert("L"))


def palette_image(levels: np.ndarray, colormap: str = "jet") -> Image.Image:
    """uint8 levels (H, W) -> palette ("P") image whose palette is the colour map."""
    picture = Image.fromarray(np.ascontiguousarray(levels, dtype=np.uint8), mode="L")
    picture.putpalette(colormap_lut(colormap))
    return picture


def colorize(levels: np.ndarray, colormap: str = "jet") -> Image.Image:
    """uint8 levels (H, W) -> RGB image through the colour map's 256-entry palette."""
    return palette_image(levels, colormap).convert("RGB")


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _half_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a + b) / 2`` of uint8 arrays rounded half to even, in uint8: what the float blend
    gives for ``alpha = 0.5`` (its halves and their sum are exact in float32), bit for bit."""
    out = a >> 1
    out += b >> 1
    carry = a & b  # both odd: the halves lost a whole level
    odd = a ^ b
    odd &= out  # one odd: half a level, which goes up when the sum so far is odd
    carry |= odd
    carry &= 1
    out += carry
    return out


def blend(img: Image.Image, colored: Image.Image, alpha: float) -> Image.Image:
    """``alpha * img + (1 - alpha) * colored``, rounded to the nearest level (RGB images)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    if alpha == 0.5:
        # The default alpha, in integers: 2.5x faster than float32, and the same pixels.
        return Image.fromarray(_half_sum(_rgb(img), _rgb(colored)), mode="RGB")
    mixed = np.multiply(_rgb(img), np.float32(alpha), dtype=np.float32)
    mixed += np.multiply(_rgb(colored), np.float32(1 - alpha), dtype=np.float32)
    np.rint(mixed, out=mixed)
    return Image.fromarray(mixed.astype(np.uint8), mode="RGB")


def heatmap(mask: MaskLike, size: tuple[int, int], colormap: str = "jet") -> Image.Image:
    """The mask (values in [0, 1]) resized to ``size`` (width, height) and coloured: RGB image."""
    return colorize(mask_levels(mask, size), colormap)


def overlay_mask(
    img: Image.Image,
    mask: MaskLike,
    colormap: str = "jet",
    alpha: float = 0.7,
) -> Image.Image:
    """Blend a coloured heatmap of ``mask`` over ``img``: ``alpha * img + (1 - alpha) * heatmap``.

    Args:
        img: the image (any PIL mode; converted to RGB).
        mask: a 2D map in [0, 1] (PIL image, tensor or array), resized to the image.
        colormap: one of ``app.cam.colormaps.COLORMAPS``.
        alpha: weight of the image in the blend, in [0, 1].
    """
    if not isinstance(img, Image.Image):
        raise TypeError("img must be a PIL image.")
    return blend(img, heatmap(mask, img.size, colormap), alpha)
