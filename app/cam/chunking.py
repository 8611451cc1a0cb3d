"""Chunk sizes of masked forwards from a time budget, so that a long pass ends a chunk (and lets
the model's other passes have their turn) about every ``budget_ms`` of device work.

On CUDA a count says little about time (32 masked resnet50 forwards take 6 ms on an H200 and
far longer on a small card), so the chunks are timed: the first has ``first`` inputs, each next
one the size that the last chunk's time per input says fits the budget (shrinking at once,
growing at most 2x a chunk, so that a first chunk slowed by warm-up does not mislead). On the
CPU the chunks keep ``first`` inputs: there the pauses inside a forward give the turns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class ChunkSizer:
    """Slices ``total`` inputs into chunks; ``timing`` around each chunk's work sizes the next."""

    def __init__(
        self,
        first: int,
        budget_ms: float,
        device: torch.device,
        cap: int,
        *,
        timed: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.size = max(1, first)
        self.budget_s = budget_ms / 1000
        self.cap = max(1, cap)
        self.device = device
        self.timed = device.type == "cuda" if timed is None else timed
        self.clock = clock
        self.sizes: list[int] = []
        """The size of every chunk handed out (the tests and the bench read it)."""

    def slices(self, total: int) -> Iterator[slice]:
        start = 0
        while start < total:
            stop = min(total, start + self.size)
            self.sizes.append(stop - start)
            yield slice(start, stop)
            start = stop

    @contextmanager
    def timing(self, count: int) -> Iterator[None]:
        """Around the device work of one chunk of ``count`` inputs."""
        if not self.timed:
            yield
            return
        started = self.clock()
        yield
        if self.device.type == "cuda":
            # This stream's chunk only: a whole-device wait would count the pictures that other
            # requests draw on the lane's drawing stream meanwhile, and shrink the chunks.
            torch.cuda.current_stream(self.device).synchronize()
        elapsed = max(self.clock() - started, 1e-9)
        fits = round(self.budget_s * count / elapsed)
        self.size = max(1, min(self.cap, fits, 2 * max(count, self.size)))
