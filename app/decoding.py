"""Phase 1 of a request: uploads -> upright images and the model's input tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from app.imaging import Box, load_image, open_image, preprocess_image, upright_size
from app.manifest import ModelSpec


@dataclass(frozen=True)
class Upload:
    """One uploaded file, already read and size-checked."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class DecodedImage:
    """An upload ready for the model and for drawing its pictures."""

    filename: str
    image: Image.Image
    """Upright RGB; a large JPEG is decoded at a reduced scale (``image.size`` says which)."""
    original_size: tuple[int, int]
    """(width, height) of the upload itself, upright."""
    tensor: torch.Tensor
    """The normalised model input, (C, H, W)."""
    box: Box
    """Where the model's crop lies in ``image``, in its pixels."""


def decode_upload(
    upload: Upload, spec: ModelSpec, max_pixels: int, picture_side: int | None
) -> DecodedImage:
    """Decode and preprocess one upload.

    ``picture_side`` is the longest side the answer's pictures need (``None``: the full image;
    0: none). A JPEG much larger than what the model and the pictures need is decoded at 1/2, 1/4
    or 1/8 scale by the decoder itself (Pillow's ``draft``), which is what makes a 12 MP photo
    cheap; other formats are decoded whole.
    """
    opened = open_image(upload.data, upload.filename, max_pixels)
    original = upright_size(opened)
    if opened.format == "JPEG" and picture_side is not None:
        scale = _needed_scale(original, spec, picture_side)
        if scale <= 0.5:
            width, height = opened.size
            opened.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    image = load_image(opened, upload.filename)
    tensor, box = preprocess_image(image, spec)
    return DecodedImage(upload.filename, image, original, tensor, box)


def stack_inputs(decoded: list[DecodedImage]) -> torch.Tensor:
    """The model inputs of a request as one (N, C, H, W) batch (stacked by numpy: no torch
    thread pool is started outside the pass thread)."""
    return torch.from_numpy(np.stack([d.tensor.numpy() for d in decoded]))


# Pictures may be drawn from a decode up to this much smaller than their size (a 4000-px photo
# decoded at 1/4 to 1000 px for a 1024-px overlay): invisible there, and 2x faster than 1/2.
_PICTURE_UPSCALE = 1.25


def _needed_scale(size: tuple[int, int], spec: ModelSpec, picture_side: int) -> float:
    """The smallest fraction of the upload's size that still serves the model and the pictures.

    The model's input is never upscaled from a reduced decode: its need is exact."""
    shortest, longest = min(size), max(size)
    for_model = max(spec.resize, *spec.crop) / shortest
    for_pictures = picture_side / longest / _PICTURE_UPSCALE
    return max(for_model, for_pictures)
