"""Tests for the synthetic shapes dataset generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.models.zoo.shapes_dataset import (
    CLASSES,
    DEFAULT_MEAN,
    DEFAULT_STD,
    ShapeSample,
    ShapesDataset,
    generate_sample,
    make_dataset,
    to_tensor_batch,
)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def test_classes() -> None:
    assert CLASSES == (
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "ring",
        "hexagon",
        "heart",
    )


def test_make_dataset_shapes_and_dtypes() -> None:
    images, masks, labels = make_dataset(12, seed=3, image_size=96)
    assert images.shape == (12, 96, 96, 3) and images.dtype == np.uint8
    assert masks.shape == (12, 96, 96) and masks.dtype == np.bool_
    assert labels.shape == (12,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)


def test_make_dataset_is_deterministic() -> None:
    a = make_dataset(16, seed=11)
    b = make_dataset(16, seed=11)
    c = make_dataset(16, seed=12)
    for x, y in zip(a, b, strict=True):
        assert x.tobytes() == y.tobytes()
    assert a[0].tobytes() != c[0].tobytes()


def test_generate_sample_is_pure_function_of_rng_state() -> None:
    s1 = generate_sample(np.random.default_rng(5))
    s2 = generate_sample(np.random.default_rng(5))
    assert isinstance(s1, ShapeSample)
    assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.mask, s2.mask)
    assert s1.label == s2.label and s1.label_name == CLASSES[s1.label]


def test_all_classes_appear() -> None:
    _, _, labels = make_dataset(200, seed=1)
    assert set(labels.tolist()) == set(range(len(CLASSES)))


@pytest.mark.parametrize("image_size", [128, 256])
def test_mask_matches_drawn_object(image_size: int) -> None:
    rng = np.random.default_rng(123)
    for _ in range(40):
        s = generate_sample(rng, image_size)
        assert s.background is not None
        area = s.mask.mean()
        assert 0.01 < area < 0.5, area
        changed = np.any(s.image != s.background, axis=-1)
        # The object is composited over the background: outside the mask's 1-pixel
        # border (anti-aliased edge pixels with coverage < 0.5) nothing changes ...
        assert not np.any(changed & ~_dilate(s.mask))
        # ... and the object is drawn in a contrasting colour, so (nearly) every mask
        # pixel differs from the render without the object.
        assert changed[s.mask].mean() > 0.98
        # The mask sits strictly inside the image (the shape is never cut by the border).
        assert not (s.mask[0].any() or s.mask[-1].any() or s.mask[:, 0].any())


def test_ring_mask_has_a_hole() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = generate_sample(rng)
        if s.label_name == "ring":
            ys, xs = np.nonzero(s.mask)
            cy, cx = int(ys.mean().round()), int(xs.mean().round())
            assert not s.mask[cy, cx]
            return
    pytest.fail("no ring generated")


def test_to_tensor_batch_matches_service_preprocessing() -> None:
    images, _, _ = make_dataset(2, seed=4)
    x = to_tensor_batch(images, DEFAULT_MEAN, DEFAULT_STD)
    assert x.shape == (2, 3, 128, 128) and x.dtype == torch.float32
    expected = (images[1, 5, 7, 2] / 255.0 - DEFAULT_MEAN[2]) / DEFAULT_STD[2]
    assert float(x[1, 2, 5, 7]) == pytest.approx(expected, abs=1e-5)


def test_torch_dataset_wrapper() -> None:
    ds = ShapesDataset(3, seed=9, image_size=96)
    images, masks, labels = make_dataset(3, seed=9, image_size=96)
    assert len(ds) == 3
    x, y, m = ds[2]
    assert x.shape == (3, 96, 96) and x.dtype == torch.float32
    assert int(y) == labels[2] and m.dtype == torch.bool
    assert np.array_equal(m.numpy(), masks[2])
    torch.testing.assert_close(x, to_tensor_batch(images[2:3])[0])


def test_pairs_hold_two_different_shapes_with_disjoint_exact_masks() -> None:
    from app.models.zoo.shapes_dataset import make_pairs

    images, masks, labels = make_pairs(6, 5, 96)
    again = make_pairs(6, 5, 96)
    assert images.tobytes() == again[0].tobytes() and masks.tobytes() == again[1].tobytes()
    assert images.shape == (6, 96, 96, 3) and masks.shape == (6, 2, 96, 96)
    assert (labels[:, 0] != labels[:, 1]).all()
    assert not (masks[:, 0] & masks[:, 1]).any()
    assert masks.sum(axis=(2, 3)).min() > 100  # both objects are there
    assert not masks[:, :, 0, :].any() and not masks[:, :, :, -1].any()  # not cut by the border
