"""Whatever a caller calls an image (a path, bytes, a PIL image, a numpy array) as an upload."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | Image.Image | np.ndarray"

#: The file endings the command line picks from a folder (the formats the service decodes).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def as_upload(image: ImageInput, filename: str | None = None) -> tuple[str, bytes]:
    """``(filename, bytes)`` for a multipart part; arrays and PIL images are sent as PNG.

    An array is ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``: uint8, or floats in [0, 1]."""
    if isinstance(image, bytes):
        return filename or "image", image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return filename or path.name, path.read_bytes()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_as_uint8(image))
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return filename or "image.png", buffer.getvalue()
    raise TypeError(
        f"cannot send a {type(image).__name__} as an image; pass a path, bytes, a PIL image "
        "or a numpy array"
    )


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image array is (H, W), (H, W, 3) or (H, W, 4); got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        _check_unit_range(array)
        scaled: np.ndarray = (array * 255).round().astype(np.uint8)
        return scaled
    raise ValueError(f"an image array is uint8 or floats in [0, 1]; got {array.dtype}")


def _check_unit_range(array: np.ndarray) -> None:
    """``ValueError`` unless every value of a float array is in [0, 1] (no NaN, no infinity):
    anything else would be sent as other pixels than the caller's."""
    if array.size == 0:
        raise ValueError(f"an image array holds at least one pixel; got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(
            "an image array of floats holds values in [0, 1]; this one holds NaN or infinity: "
            "replace them (np.nan_to_num) before sending it"
        )
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"an image array of floats holds values in [0, 1]; this one holds {low:g} to {high:g}: "
            "scale it (divide 0-255 values by 255) or pass it as uint8"
        )


def find_images(paths: list[Path]) -> list[Path]:
    """The files named, and the image files of the folders named (sorted, not recursive)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found
