"""What the detection and segmentation pipelines share: decoding an upload whole (no square
crop), running work on the model's threads under its lock, and drawing a map with outlines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from app.models.manifest import ModelSpec
from app.pipeline.decoding import Box, DecodedImage, Upload, load_image, open_image
from app.pipeline.rendering import (
    OUTPUT_KINDS,
    Canvas,
    MapJob,
    RenderStyle,
    encode_image,
    to_base64,
)

#: The most boxes that ``box=all`` explains in one request (each is a pass of its own).
MAX_EXPLAINED_BOXES = 10
OUTLINE = (255, 255, 255)


def input_size(size: tuple[int, int], spec: ModelSpec) -> tuple[int, int]:
    """The model input's (width, height) for an upload of ``size``: scaled down so that its
    longest side is at most ``spec.max_side``, never up."""
    width, height = size
    scale = min(1.0, spec.max_side / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_whole(upload: Upload, spec: ModelSpec, max_pixels: int) -> DecodedImage:
    """The upload as the model's input at its own aspect ratio: scaled down so that its longest
    side is at most ``spec.max_side``, never cropped or squared. The box is the whole image."""
    opened = open_image(upload.data, upload.filename, max_pixels)
    image = load_image(opened, upload.filename)
    original = image.size  # upright, and decoded whole (no JPEG draft)
    width, height = image.size
    size = input_size(image.size, spec)
    model_input = image
    if size != image.size:
        model_input = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if spec.input_shape[0] == 1:
        model_input = model_input.convert("L")
    array = np.asarray(model_input, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = ((array / np.float32(255.0) - mean) / std).transpose(2, 0, 1)
    tensor = torch.from_numpy(np.ascontiguousarray(normalised))
    return DecodedImage(upload.filename, image, original, tensor, Box(0, 0, width, height))


@dataclass(frozen=True)
class Scale:
    """From the model input's pixels to the upload's."""

    sx: float
    sy: float

    @classmethod
    def of(cls, decoded: DecodedImage) -> Scale:
        height, width = decoded.tensor.shape[-2:]
        return cls(decoded.original_size[0] / width, decoded.original_size[1] / height)

    def box(self, box: Sequence[float]) -> list[float]:
        x0, y0, x1, y1 = (float(v) for v in box)
        return [
            round(x0 * self.sx, 2),
            round(y0 * self.sy, 2),
            round(x1 * self.sx, 2),
            round(y1 * self.sy, 2),
        ]

    def to_input(self, box: Sequence[float]) -> list[float]:
        x0, y0, x1, y1 = (float(v) for v in box)
        return [x0 / self.sx, y0 / self.sy, x1 / self.sx, y1 / self.sy]


@dataclass(frozen=True)
class Outline:
    """A box drawn on an overlay with its caption, in the upload's pixels."""

    box: Sequence[float]
    caption: str


def render_map(
    decoded: DecodedImage,
    cam: torch.Tensor,
    normalized: bool,
    style: RenderStyle,
    outlines: Sequence[Outline],
) -> dict[str, object]:
    """The fields of one ``MapOutput`` (without layer and kind): overlays carry the outlines."""
    crop = tuple(decoded.tensor.shape[-2:])
    canvas = Canvas.build(decoded, style.size, (int(crop[0]), int(crop[1])))
    job = MapJob(cam, normalized, canvas if style.draws_pictures else None, style)
    fields: dict[str, object] = {
        "width": canvas.picture.width if style.draws_pictures else None,
        "height": canvas.picture.height if style.draws_pictures else None,
        "region": list(canvas.region) if style.draws_pictures else None,
    }
    for name in style.outputs:
        if name == "overlay":
            picture = _blend(canvas, job, style.alpha)
            _draw_outlines(picture, outlines, decoded.original_size)
            fields[name] = to_base64(encode_image(picture, style.image_format))
        else:
            fields[name] = OUTPUT_KINDS[name].render(job)
    return fields


def _blend(canvas: Canvas, job: MapJob, alpha: float) -> Image.Image:
    from app.cam import blend

    return blend(canvas.picture, job.colored, alpha)


def _draw_outlines(
    picture: Image.Image, outlines: Sequence[Outline], original: tuple[int, int]
) -> None:
    draw = ImageDraw.Draw(picture)
    sx, sy = picture.width / original[0], picture.height / original[1]
    width = max(1, round(max(picture.size) / 200))
    for outline in outlines:
        x0, y0, x1, y1 = outline.box
        rect = (x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1))
        draw.rectangle(rect, outline=OUTLINE, width=width)
        left, top = rect[0], max(0.0, rect[1] - 11)
        text_box = draw.textbbox((left, top), outline.caption)
        draw.rectangle(text_box, fill=(0, 0, 0))
        draw.text((left, top), outline.caption, fill=OUTLINE)


def label_png(labels: torch.Tensor, size: tuple[int, int]) -> str:
    """A (h, w) map of class indices as a base64 8-bit PNG of ``size`` (width, height)."""
    array = labels.to(torch.uint8).cpu().numpy()
    picture = Image.fromarray(array, mode="L")
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.NEAREST)
    return to_base64(encode_image(picture, "png"))
