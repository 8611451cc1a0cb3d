"""Chunk sizes from a time budget: timed chunks grow or shrink to it, untimed ones keep their
size. A fake clock stands for the device's time."""

from __future__ import annotations

import torch

from app.cam.chunking import ChunkSizer


class _Clock:
    """Each chunk takes ``per_input`` seconds an input."""

    def __init__(self, per_input: float) -> None:
        self.per_input = per_input
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(sizer: ChunkSizer, clock: _Clock, total: int) -> list[int]:
    for part in sizer.slices(total):
        count = part.stop - part.start
        with sizer.timing(count):
            clock.now += clock.per_input * count
    return sizer.sizes


def test_fast_chunks_grow_by_at_most_2x_a_chunk_up_to_the_budget_and_the_cap() -> None:
    clock = _Clock(0.0001)  # 0.1 ms an input: 20 ms fits 200
    sizer = ChunkSizer(32, 20.0, torch.device("cpu"), cap=256, timed=True, clock=clock)
    assert _run(sizer, clock, 1200) == [32, 64, 128, 200, 200, 200, 200, 176]


def test_slow_chunks_shrink_at_once_and_never_below_one() -> None:
    clock = _Clock(0.005)  # 5 ms an input: 20 ms fits 4
    sizer = ChunkSizer(32, 20.0, torch.device("cpu"), cap=256, timed=True, clock=clock)
    assert _run(sizer, clock, 44) == [32, 4, 4, 4]
    clock = _Clock(1.0)
    sizer = ChunkSizer(8, 20.0, torch.device("cpu"), cap=256, timed=True, clock=clock)
    assert _run(sizer, clock, 10) == [8, 1, 1]


def test_the_cap_bounds_the_chunks() -> None:
    clock = _Clock(1e-7)
    sizer = ChunkSizer(100, 20.0, torch.device("cpu"), cap=150, timed=True, clock=clock)
    assert max(_run(sizer, clock, 1000)) == 150


def test_on_the_cpu_chunks_keep_their_size() -> None:
    clock = _Clock(1.0)
    sizer = ChunkSizer(32, 20.0, torch.device("cpu"), cap=256, clock=clock)
    assert not sizer.timed
    assert _run(sizer, clock, 70) == [32, 32, 6]
