"""Overlay a class activation map on the image it explains."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch import Tensor

from app.cam.colormaps import apply_colormap


def _mask_array(mask: Image.Image | Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mask, Tensor):
        array = mask.detach().float().cpu().numpy()
    elif isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("F"), dtype=np.float32)
        if mask.mode in ("L", "P", "RGB", "RGBA", "I;16"):
            array = array / (65535.0 if mask.mode == "I;16" else 255.0)
    else:
        array = np.asarray(mask, dtype=np.float32)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"The mask must be a single 2D map, got shape {array.shape}.")
    return np.nan_to_num(array)


def heatmap(mask: Image.Image | Tensor | np.ndarray, size: tuple[int, int], colormap: str = "jet"):
    """The mask (values in [0, 1]) resized to ``size`` (width, height) and coloured: RGB image."""
    values = Image.fromarray(_mask_array(mask).astype(np.float32), mode="F")
    values = values.resize(size, resample=Image.Resampling.BICUBIC)
    return Image.fromarray(apply_colormap(np.asarray(values), colormap), mode="RGB")


def overlay_mask(
    img: Image.Image,
    mask: Image.Image | Tensor | np.ndarray,
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
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    base = img.convert("RGB")
    colored = heatmap(mask, base.size, colormap)
    blended = alpha * np.asarray(base, dtype=np.float32) + (1 - alpha) * np.asarray(
        colored, dtype=np.float32
    )
    return Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8), mode="RGB")
