"""Host -> device copies through reused page-locked (pinned) buffers.

A pinned buffer lets the copy run asynchronously at the bus's speed, but pinning is slow (a
system call and a page-table walk per call), so buffers are kept and handed out again. A buffer
returns to the pool with the event of its copy; it is reused only once that copy has ended.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor


class PinnedStaging:
    """Copies numpy arrays to ``device`` through at most ``keep`` reused host buffers.

    On a CPU device (tests, the CPU lane) nothing is pinned and the copy is a plain clone."""

    def __init__(self, device: torch.device, keep: int = 8) -> None:
        self.device = device
        self.keep = keep
        self.pinned = device.type == "cuda"
        self._free: list[tuple[Tensor, torch.cuda.Event | None]] = []
        self._lock = threading.Lock()
        self.allocated = 0
        """Buffers allocated so far (a test reads it: reuse keeps it flat)."""

    def to_device(self, array: np.ndarray) -> Tensor:
        """A copy of ``array`` on the device, of its shape and dtype."""
        nbytes = array.nbytes
        buffer = self._take(nbytes)
        dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
        host = buffer[:nbytes].view(dtype).view(array.shape)
        np.copyto(host.numpy(), array)  # Pillow's arrays are read-only: no torch view of them
        if not self.pinned:
            copied = host.clone()
            self._give(buffer, None)
            return copied
        copied = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        self._give(buffer, event)
        return copied

    def _take(self, nbytes: int) -> Tensor:
        with self._lock:
            fits = [i for i, (b, _) in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i][0].numel())
                buffer, event = self._free.pop(best)
                if event is not None:
                    event.synchronize()
                return buffer
            self.allocated += 1
        # Power-of-two sizes: images of similar sizes share buffers.
        size = 1 << max(16, (nbytes - 1).bit_length())
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def _give(self, buffer: Tensor, event: torch.cuda.Event | None) -> None:
        with self._lock:
            self._free.append((buffer, event))
            if len(self._free) > self.keep:
                self._free.sort(key=lambda pair: pair[0].numel())
                self._free.pop(0)
