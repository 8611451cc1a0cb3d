"""Device lanes: where a request's image work runs, chosen once at startup with the device.

A lane decodes a request's uploads into ``DecodedImage``s and stacks their model inputs into
the batch. ``CpuLane`` is the Pillow code of ``app.pipeline.decoding`` as it always was;
``CudaLane`` decodes JPEGs with nvJPEG and resizes, crops and normalises on the GPU, and draws
the pictures there (``app.pipeline.lanes.drawing``). Both run the same header checks first and
raise the same errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from app.models.manifest import ModelSpec
from app.pipeline.decoding import DecodedImage, Upload
from app.pipeline.rendering import Painter


class DeviceLane(Protocol):
    """The image work of one device."""

    name: str
    device: torch.device

    @property
    def painter(self) -> Painter | None:
        """Draws the pictures of the images it decoded on its device (None: Pillow does)."""
        ...

    def decode(
        self,
        uploads: Sequence[Upload],
        spec: ModelSpec,
        max_pixels: int,
        picture_side: int | None,
    ) -> list[DecodedImage]:
        """Header checks, then decode and preprocess every upload (``decode_upload``'s
        contract, errors included)."""
        ...

    def stack(self, decoded: Sequence[DecodedImage]) -> torch.Tensor:
        """The model inputs of a request as one (N, C, H, W) batch."""
        ...


def lane_for(device: torch.device) -> DeviceLane:
    """The lane of a model's device: CUDA's for a CUDA device, else the CPU's."""
    from app.pipeline.lanes.cpu import CpuLane

    if device.type == "cuda":
        from app.pipeline.lanes.cuda import CudaLane

        return CudaLane(device)
    return CpuLane(device)
