"""Drawing on the lane's device: the map upsampled, coloured through the colour map's 256-entry
table, blended over the picture, and a JPEG encoded there, so that only its bytes come back.

The same steps as ``rendering`` and ``app.cam.overlay`` (8-bit levels, one table look-up, one
rounding), on torch tensors of any device: on CUDA the JPEG is encoded by nvJPEG
(``torchvision.io.encode_jpeg``); PNG and WebP pictures, and every picture on the CPU, copy the
pixels back and are encoded by Pillow with ``rendering.encode_image``'s settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.io import encode_jpeg

from app.cam import colormap_lut, normalize_maps, palette_image
from app.pipeline.decoding import DecodedImage
from app.pipeline.lanes import tensor_image
from app.pipeline.rendering import (
    PictureSize,
    RenderStyle,
    encode_image,
    to_base64,
)

#: nvJPEG's quality for the overlays, as Pillow's (q90).
JPEG_QUALITY = 90
_ALPHA_FORMATS = ("png", "webp")


@dataclass(frozen=True)
class TensorCanvas:
    """The upload at the pictures' size on the device, and where the map lies on it."""

    picture: Tensor
    """uint8 (3, H, W)."""
    region: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.picture.shape[2]), int(self.picture.shape[1])

    @property
    def covers_all(self) -> bool:
        return self.region == (0, 0, *self.size)

    @classmethod
    def build(cls, decoded: DecodedImage, size: PictureSize, crop: tuple[int, int]) -> TensorCanvas:
        """``rendering.Canvas.build`` on ``decoded.pixels``."""
        assert decoded.pixels is not None
        pixels, box = decoded.pixels, decoded.box
        width, height = size.canvas_size(decoded.original_size, crop)
        if size.kind == "input":
            left, top = max(0, round(box.left)), max(0, round(box.top))
            right, bottom = round(box.right), round(box.bottom)
            inside = pixels[:, top : max(bottom, top + 1), left : max(right, left + 1)]
            return cls(tensor_image.resize(inside, (width, height)), (0, 0, width, height))
        image_h, image_w = int(pixels.shape[1]), int(pixels.shape[2])
        picture = tensor_image.resize(pixels, (width, height))
        sx, sy = width / image_w, height / image_h
        left, top = max(0, round(box.left * sx)), max(0, round(box.top * sy))
        right, bottom = min(width, round(box.right * sx)), min(height, round(box.bottom * sy))
        return cls(picture, (left, top, max(right, left + 1), max(bottom, top + 1)))


@cache
def _lut(colormap: str, device: torch.device) -> Tensor:
    return (
        torch.frombuffer(bytearray(colormap_lut(colormap)), dtype=torch.uint8)
        .reshape(256, 3)
        .to(device)
    )


def map_values(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """A map in [0, 1] resized (bilinear) to ``size`` (width, height): float (H, W)."""
    values = torch.nan_to_num(cam.float(), nan=0.0, posinf=1.0, neginf=0.0)
    width, height = size
    if tuple(values.shape) == (height, width):
        return values
    shrinks = height < values.shape[0] or width < values.shape[1]
    return F.interpolate(
        values[None, None],
        size=(height, width),
        mode="bilinear",
        align_corners=False,
        antialias=shrinks,
    )[0, 0]


def map_levels(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """``overlay.mask_levels`` on a tensor: uint8 (H, W), 255 v + 0.5 truncated and clipped."""
    return (map_values(cam, size) * 255 + 0.5).floor_().clamp_(0, 255).to(torch.uint8)


def colored(levels: Tensor, colormap: str) -> Tensor:
    """uint8 levels (H, W) -> uint8 RGB (3, H, W) through the colour map's table."""
    return _lut(colormap, levels.device)[levels.long()].permute(2, 0, 1)


def blend(picture: Tensor, colors: Tensor, alpha: float) -> Tensor:
    """``alpha * picture + (1 - alpha) * colors`` rounded to the nearest level (uint8)."""
    mixed = picture.float() * alpha + colors.float() * (1 - alpha)
    return mixed.round_().to(torch.uint8)


class TensorPainter:
    """Draws the overlay and heatmap pictures of images decoded on the lane's device."""

    def canvas(
        self, decoded: DecodedImage, size: PictureSize, crop: tuple[int, int]
    ) -> TensorCanvas | None:
        """The canvas of an image this painter draws (None: Pillow draws it)."""
        if decoded.pixels is None:
            return None
        return TensorCanvas.build(decoded, size, crop)

    def levels(self, cam: Tensor, normalized: bool, canvas: TensorCanvas) -> Tensor:
        left, top, right, bottom = canvas.region
        cam = cam.to(canvas.picture.device)
        cam = cam if normalized else normalize_maps(cam[None])[0]
        return map_levels(cam, (right - left, bottom - top))

    def overlay(
        self, cam: Tensor, normalized: bool, canvas: TensorCanvas, style: RenderStyle
    ) -> Tensor:
        left, top, right, bottom = canvas.region
        colors = colored(self.levels(cam, normalized, canvas), style.colormap)
        inside = blend(canvas.picture[:, top:bottom, left:right], colors, style.alpha)
        if canvas.covers_all:
            return inside
        picture = canvas.picture.clone()
        picture[:, top:bottom, left:right] = inside
        return picture

    def render(
        self, name: str, cam: Tensor, normalized: bool, canvas: TensorCanvas, style: RenderStyle
    ) -> str:
        """The base64 picture of output kind ``name`` (overlay or heatmap)."""
        if name == "overlay":
            return to_base64(
                encode(self.overlay(cam, normalized, canvas, style), style.image_format)
            )
        return to_base64(self._heatmap(cam, normalized, canvas, style))

    def _heatmap(
        self, cam: Tensor, normalized: bool, canvas: TensorCanvas, style: RenderStyle
    ) -> bytes:
        levels = self.levels(cam, normalized, canvas)
        fmt = style.image_format
        if canvas.covers_all:
            if fmt == "png":  # a palette PNG: the levels come back, one byte a pixel
                return encode_image(palette_image(levels.cpu().numpy(), style.colormap), fmt)
            return encode(colored(levels, style.colormap), fmt)
        # Outside the crop: transparent where the format has alpha, else the colour map's zero.
        width, height = canvas.size
        left, top, right, bottom = canvas.region
        colors = colored(levels, style.colormap)
        if fmt in _ALPHA_FORMATS:
            picture = torch.zeros((4, height, width), dtype=torch.uint8, device=colors.device)
            picture[:3, top:bottom, left:right] = colors
            picture[3, top:bottom, left:right] = 255
        else:
            zero = _lut(style.colormap, colors.device)[0].reshape(3, 1, 1)
            picture = zero.expand(3, height, width).clone()
            picture[:, top:bottom, left:right] = colors
        return encode(picture, fmt)


def encode(pixels: Tensor, image_format: str) -> bytes:
    """uint8 (3 or 4, H, W) -> the bytes of a png, jpeg or webp: JPEG by nvJPEG on CUDA (only the
    bytes come back), everything else by Pillow from the pixels copied back."""
    if image_format == "jpeg" and pixels.device.type == "cuda" and pixels.shape[0] == 3:
        encoded = encode_jpeg(pixels.contiguous(), quality=JPEG_QUALITY)
        assert isinstance(encoded, Tensor)
        return bytes(encoded.cpu().numpy().tobytes())
    array = np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())
    return encode_image(
        Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB"), image_format
    )
