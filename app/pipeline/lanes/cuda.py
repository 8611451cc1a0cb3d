"""The CUDA lane: the tensor lane on a GPU, JPEGs decoded by nvJPEG on a stream of their own
and the pictures drawn on another (``StreamPainter``), so that decoding, the model's pass (on
the default stream) and drawing overlap on the GPU.

torchvision.io, not TorchCodec: torchvision is already a dependency (the model zoo) and its
``decode_jpeg`` takes a list of JPEGs and decodes them in one batched nvJPEG call; TorchCodec's
image decoding would add a package (and its FFmpeg libraries) for the same nvJPEG underneath.

nvJPEG writes its output while kernels queued earlier may still read memory the caching
allocator handed it (torchvision PR 9606): decoding runs on its own stream, which is
synchronised before each call, and its outputs are recorded on the default stream so their
blocks are not reused while the model's work still reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from app.pipeline.decoding import DecodedImage
from app.pipeline.lanes.drawing import TensorCanvas, TensorPainter
from app.pipeline.lanes.tensor import TensorLane, _decode_each
from app.pipeline.rendering import PictureSize, RenderStyle


class StreamPainter(TensorPainter):
    """``TensorPainter`` with its kernels on a stream of its own (shared by the image threads).

    The maps and the pixels it reads were made on the default stream: the drawing stream waits
    there first (a wait on the GPU, not in Python), and records them as in use, so that the
    caching allocator does not hand their blocks to later default-stream work while drawing still
    reads them. ``render`` gives bytes only after its stream has done: ``encode`` copies the JPEG
    (or the pixels) back with a blocking copy on the current stream, which is this one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    @contextmanager
    def _drawing(self, *inputs: Tensor | None) -> Iterator[None]:
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.default_stream(self.device))
            for tensor in inputs:
                if tensor is not None and tensor.is_cuda:
                    tensor.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                yield

    def canvas(
        self, decoded: DecodedImage, size: PictureSize, crop: tuple[int, int]
    ) -> TensorCanvas | None:
        with self._drawing(decoded.pixels):
            return super().canvas(decoded, size, crop)

    def render(
        self, name: str, cam: Tensor, normalized: bool, canvas: TensorCanvas, style: RenderStyle
    ) -> str:
        with self._drawing(cam, canvas.picture):
            picture = super().render(name, cam, normalized, canvas, style)
            self.stream.synchronize()  # nothing of this picture is left queued
            return picture


class CudaLane(TensorLane):
    name = "cuda"

    def __init__(
        self, device: torch.device, *, channels_last: bool = False, max_jpegs: int = 64
    ) -> None:
        super().__init__(device, channels_last=channels_last, max_jpegs=max_jpegs)
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.painter = StreamPainter(device)

    def _decode_jpegs(self, data: list[bytes]) -> list[Tensor | None]:
        with torch.cuda.device(self.device):
            self.stream.synchronize()
            # Work queued on the default stream may still read blocks nvJPEG will be given.
            self.stream.wait_stream(torch.cuda.default_stream(self.device))
            with torch.cuda.stream(self.stream):
                decoded = _decode_each(data, self.device)
            self.stream.synchronize()
            default = torch.cuda.default_stream(self.device)
            for tensor in decoded:
                if tensor is not None:
                    tensor.record_stream(default)
        return decoded
