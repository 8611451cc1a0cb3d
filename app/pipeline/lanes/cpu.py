"""The CPU lane: Pillow decodes and preprocesses on the decode threads (``decoding``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.models.manifest import ModelSpec
from app.pipeline.decoding import DecodedImage, Upload, decode_upload, stack_inputs
from app.pipeline.rendering import Painter


class CpuLane:
    name = "cpu"
    painter: Painter | None = None
    """Pillow draws (``rendering``)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    def decode(
        self,
        uploads: Sequence[Upload],
        spec: ModelSpec,
        max_pixels: int,
        picture_side: int | None,
    ) -> list[DecodedImage]:
        return [decode_upload(u, spec, max_pixels, picture_side) for u in uploads]

    def stack(self, decoded: Sequence[DecodedImage]) -> torch.Tensor:
        return stack_inputs(list(decoded))
