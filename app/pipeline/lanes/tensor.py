"""The tensor lane: uploads decoded to tensors on the lane's device and preprocessed there.

JPEGs are decoded by torchvision.io (nvJPEG on CUDA, libjpeg-turbo on the CPU), the decodes of
concurrent requests in one call (``Combiner``); their EXIF orientation, which the CUDA decoder
ignores, is read from the header on the CPU and applied to the tensor. Other formats, and the
JPEGs nvJPEG does not take (CMYK, YCCK), are decoded by Pillow on the calling (decode) thread and
copied over through reused pinned buffers. Every upload's header is checked by
``decoding.open_image`` before anything is decoded, so the limits and the errors are the CPU
lane's; a JPEG the tensor decoder rejects is decoded by the CPU lane instead, which either
manages or raises the CPU lane's 400.

``CudaLane`` is this lane on a CUDA device; on the CPU it is what the tests run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from app.models.manifest import ModelSpec
from app.pipeline.decoding import (
    DecodedImage,
    Upload,
    _draft,
    decode_upload,
    exif_orientation,
    load_image,
    open_image,
    original_size,
    upright,
)
from app.pipeline.lanes import tensor_image
from app.pipeline.lanes.combining import Combiner
from app.pipeline.lanes.drawing import TensorPainter
from app.pipeline.lanes.staging import PinnedStaging

logger = logging.getLogger(__name__)

#: JPEG modes the tensor decoders read as RGB (Pillow's names).
_TENSOR_JPEG_MODES = ("RGB", "L")


class TensorLane:
    """Decode and preprocess on ``device`` with torch; ``channels_last`` batches for the
    convolutions that run faster in it."""

    name = "tensor"

    def __init__(
        self, device: torch.device, *, channels_last: bool = False, max_jpegs: int = 64
    ) -> None:
        self.device = device
        self.channels_last = channels_last
        self.staging = PinnedStaging(device)
        self.jpegs: Combiner[bytes, Tensor | None] = Combiner(self._decode_jpegs, max_jpegs)
        self.painter = TensorPainter()
        """Draws the pictures of the images this lane decoded (``rendering.draw_maps``)."""
        self.fallbacks = 0
        """JPEGs the tensor decoder rejected and the CPU lane decoded (or refused)."""

    # --- what a device says
    def _decode_jpegs(self, data: list[bytes]) -> list[Tensor | None]:
        """JPEG bytes -> uint8 (3, H, W) as stored, on the device; None where it refused."""
        return _decode_each(data, self.device)

    # --- the lane
    def decode(
        self,
        uploads: Sequence[Upload],
        spec: ModelSpec,
        max_pixels: int,
        picture_side: int | None,
    ) -> list[DecodedImage]:
        opened = [open_image(u.data, u.filename, max_pixels) for u in uploads]
        on_tensor = [
            i
            for i, image in enumerate(opened)
            if image.format == "JPEG" and image.mode in _TENSOR_JPEG_MODES
        ]
        decoded_jpegs = dict(
            zip(on_tensor, self.jpegs.submit([uploads[i].data for i in on_tensor]), strict=True)
        )
        results = []
        for index, (upload, image) in enumerate(zip(uploads, opened, strict=True)):
            stored = image.size
            _draft(image, spec, picture_side)
            if index in decoded_jpegs:
                decoded = decoded_jpegs[index]
                if decoded is None:
                    self.fallbacks += 1
                    logger.debug("%s: refused by the tensor decoder; CPU lane", upload.filename)
                    results.append(self._from_cpu_lane(upload, spec, max_pixels, picture_side))
                    continue
                orientation = exif_orientation(image)  # a JPEG's: read with its header
                pixels = tensor_image.resize(
                    tensor_image.orient(decoded, orientation),
                    upright(image.size, orientation),  # at the draft's scale
                )
                original = upright(stored, orientation)
            else:
                loaded = load_image(image, upload.filename)
                pixels = self._upload_pixels(loaded)
                original = original_size(image, stored, loaded)
            results.append(self._decoded(upload.filename, pixels, original, spec))
        return results

    def stack(self, decoded: Sequence[DecodedImage]) -> Tensor:
        batch = torch.stack([d.tensor for d in decoded])
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _from_cpu_lane(
        self, upload: Upload, spec: ModelSpec, max_pixels: int, picture_side: int | None
    ) -> DecodedImage:
        decoded = decode_upload(upload, spec, max_pixels, picture_side)
        pixels = self._upload_pixels(decoded.image)
        return self._decoded(upload.filename, pixels, decoded.original_size, spec)

    def _upload_pixels(self, image: Image.Image) -> Tensor:
        """An upright RGB Pillow image -> uint8 (3, H, W) on the device."""
        return self.staging.to_device(np.asarray(image)).permute(2, 0, 1)

    def _decoded(
        self, filename: str, pixels: Tensor, original: tuple[int, int], spec: ModelSpec
    ) -> DecodedImage:
        tensor, box = tensor_image.preprocess(pixels, spec)
        # The Pillow image serves the drawings that stay on the CPU (png and webp pictures).
        image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), "RGB")
        return DecodedImage(filename, image, original, tensor, box, pixels=pixels)


def _decode_each(data: list[bytes], device: torch.device) -> list[Tensor | None]:
    """One batched call; when it fails, each image alone, so one bad JPEG fails alone."""
    buffers = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(_decode(buffers, device))
    except RuntimeError:
        pass
    decoded: list[Tensor | None] = []
    for buffer in buffers:
        try:
            decoded.append(_decode([buffer], device)[0])
        except RuntimeError:
            decoded.append(None)
    return decoded


def _decode(buffers: list[Tensor], device: torch.device) -> list[Tensor]:
    if device.type == "cpu":
        return [decode_jpeg(b, mode=ImageReadMode.RGB) for b in buffers]
    return list(decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device))
