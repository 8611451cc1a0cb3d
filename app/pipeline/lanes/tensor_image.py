"""Image work on torch tensors, the same on any device: EXIF orientation, the model's resize,
crop and normalisation, and the resize of a picture.

The GPU lane runs these on CUDA; the tests run them on the CPU against the Pillow code of
``app.pipeline.decoding`` (the two agree within a couple of levels). Pixels are uint8
(C, H, W); the geometry (scale, crop box) is the CPU lane's, so both lanes crop the same region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from app.models.manifest import ModelSpec
from app.pipeline.decoding import Box

#: ITU-R 601-2 luma, as Pillow's convert("L") weighs R, G and B.
_LUMA = (0.299, 0.587, 0.114)


def orient(pixels: Tensor, orientation: int) -> Tensor:
    """(C, H, W) as stored -> upright, for an EXIF orientation tag (1..8; others: as stored)."""
    if orientation == 2:
        return pixels.flip(2)
    if orientation == 3:
        return pixels.flip(1, 2)
    if orientation == 4:
        return pixels.flip(1)
    if orientation == 5:
        return pixels.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(pixels, -1, (1, 2))
    if orientation == 7:
        return pixels.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(pixels, 1, (1, 2))
    return pixels


def resize(pixels: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """uint8 (C, H, W) -> uint8 (C, height, width) for ``size`` = (width, height), antialiased
    when it shrinks (as Pillow's filters are), rounded to the nearest level."""
    width, height = size
    if pixels.shape[1:] == (height, width):
        return pixels
    return _to_uint8(_resized(pixels.float(), (height, width), mode))


def _resized(values: Tensor, hw: tuple[int, int], mode: str) -> Tensor:
    if mode == "nearest":
        return F.interpolate(values[None], size=hw, mode="nearest-exact")[0]
    shrinks = hw[0] < values.shape[1] or hw[1] < values.shape[2]
    return F.interpolate(values[None], size=hw, mode=mode, align_corners=False, antialias=shrinks)[
        0
    ]


def _to_uint8(values: Tensor) -> Tensor:
    return values.round_().clamp_(0, 255).to(torch.uint8)


def preprocess(pixels: Tensor, spec: ModelSpec) -> tuple[Tensor, Box]:
    """Upright uint8 RGB (3, H, W) -> the normalised model input (C, h, w) and the crop box,
    with ``decoding.preprocess_image``'s geometry: shorter side to ``spec.resize``, centre
    crop, then ``(x / 255 - mean) / std``."""
    crop_h, crop_w = spec.crop
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    scale = max(spec.resize / min(width, height), crop_h / height, crop_w / width)
    new_w, new_h = max(crop_w, round(width * scale)), max(crop_h, round(height * scale))
    left, top = round((new_w - crop_w) / 2), round((new_h - crop_h) / 2)
    sx, sy = new_w / width, new_h / height
    box = Box(left / sx, top / sy, (left + crop_w) / sx, (top + crop_h) / sy)
    # Resize then crop: Pillow resamples the box alone, which gives the same pixels to a level.
    resized = _resized(pixels.float(), (new_h, new_w), spec.interpolation)
    values = resized[:, top : top + crop_h, left : left + crop_w].round().clamp(0, 255)
    if spec.input_shape[0] == 1:
        weights = torch.tensor(_LUMA, device=values.device).reshape(3, 1, 1)
        values = (values * weights).sum(0, keepdim=True).round()
    mean = torch.tensor(spec.mean, device=values.device).reshape(-1, 1, 1)
    std = torch.tensor(spec.std, device=values.device).reshape(-1, 1, 1)
    return ((values / 255.0 - mean) / std).contiguous(), box
