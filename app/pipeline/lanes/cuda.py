"""The CUDA lane: the tensor lane on a GPU, JPEGs decoded by nvJPEG on a stream of their own.

torchvision.io, not TorchCodec: torchvision is already a dependency (the model zoo) and its
``decode_jpeg`` takes a list of JPEGs and decodes them in one batched nvJPEG call; TorchCodec's
image decoding would add a package (and its FFmpeg libraries) for the same nvJPEG underneath.

nvJPEG writes its output while kernels queued earlier may still read memory the caching
allocator handed it (torchvision PR 9606): decoding runs on its own stream, which is
synchronised before each call, and its outputs are recorded on the default stream so their
blocks are not reused while the model's work still reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.pipeline.lanes.tensor import TensorLane, _decode_each


class CudaLane(TensorLane):
    name = "cuda"

    def __init__(
        self, device: torch.device, *, channels_last: bool = False, max_jpegs: int = 64
    ) -> None:
        super().__init__(device, channels_last=channels_last, max_jpegs=max_jpegs)
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

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
