"""Uploads and comparisons shared by the lane tests."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth RGB picture (upscaled noise): what a photo's pixels look like to a resize."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def encoded(image: Image.Image, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    save: dict[str, object] = {"quality": 92} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def levels(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as float (3, H, W) levels."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)


def mean_level_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float().cpu() - b.float().cpu()).abs().mean())
