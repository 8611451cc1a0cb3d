"""Pinned staging buffers are reused, and every copy keeps its own values."""

from __future__ import annotations

import numpy as np
import torch

from app.pipeline.lanes.staging import PinnedStaging


def test_copies_are_exact_and_buffers_reused() -> None:
    staging = PinnedStaging(torch.device("cpu"), keep=2)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, 50, 3), dtype=np.uint8) for h in (40, 30, 40, 20)]
    copies = [staging.to_device(a) for a in arrays]
    for array, copy in zip(arrays, copies, strict=True):
        assert np.array_equal(copy.numpy(), array)  # a later copy never overwrote an earlier one
    assert staging.allocated == 1


def test_a_larger_array_gets_a_larger_buffer_and_the_pool_stays_bounded() -> None:
    staging = PinnedStaging(torch.device("cpu"), keep=1)
    small = staging.to_device(np.ones((10, 10), np.float32))
    large = staging.to_device(np.zeros((1000, 1000), np.float32))
    assert small.dtype == torch.float32 and float(small.sum()) == 100
    assert large.shape == (1000, 1000)
    assert staging.allocated == 2
    assert len(staging._free) == 1
