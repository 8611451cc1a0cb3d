"""overlay_mask and the colour maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app.cam import COLORMAPS, apply_colormap, overlay_mask
from app.cam.overlay import blend


def test_overlay_size_mode_and_blend():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    mask = torch.zeros(6, 8)
    out = overlay_mask(img, mask, colormap="gray", alpha=0.5)
    assert out.size == (40, 30) and out.mode == "RGB"
    # A zero mask is black in "gray": the blend halves the image.
    assert np.asarray(out)[15, 20].tolist() == [5, 100, 15]


def test_alpha_one_is_the_image_and_zero_is_the_heatmap():
    img = Image.new("L", (16, 16), 90)
    mask = torch.ones(4, 4)
    assert np.array_equal(np.asarray(overlay_mask(img, mask, alpha=1.0)), np.full((16, 16, 3), 90))
    heat = np.asarray(overlay_mask(img, mask, colormap="jet", alpha=0.0))
    assert heat[8, 8].tolist() == apply_colormap(np.array(1.0), "jet").tolist()


def test_tensor_and_pil_masks_agree():
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    values = torch.linspace(0, 1, 64).reshape(8, 8)
    pil_mask = Image.fromarray((values.numpy() * 255).round().astype(np.uint8))
    a = np.asarray(overlay_mask(img, values), dtype=int)
    b = np.asarray(overlay_mask(img, pil_mask), dtype=int)
    assert np.abs(a - b).max() <= 3


def _float_blend(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    mixed = a.astype(np.float32) * np.float32(alpha) + b.astype(np.float32) * np.float32(1 - alpha)
    return np.rint(mixed).astype(np.uint8)


def test_the_default_alpha_blends_every_pair_of_levels_as_the_float_formula():
    # Every (image, colour) pair of levels, once per channel: the integer path of alpha 0.5
    # rounds half to even exactly as float32 does.
    levels = np.arange(256, dtype=np.uint8)
    a, b = (np.repeat(g[..., None], 3, axis=2) for g in np.meshgrid(levels, levels))
    out = np.asarray(blend(Image.fromarray(a), Image.fromarray(b), 0.5))
    assert np.array_equal(out, _float_blend(a, b, 0.5))


def test_blend_takes_any_mode_at_any_alpha():
    gray = Image.new("L", (4, 4), 3)
    colored = Image.new("RGB", (4, 4), (0, 255, 8))
    assert np.asarray(blend(gray, colored, 0.5))[0, 0].tolist() == [2, 129, 6]
    assert np.asarray(blend(gray, colored, 0.3))[0, 0].tolist() == [1, 179, 6]


def test_jet_endpoints():
    assert apply_colormap(np.array([0.0, 0.5, 1.0]), "jet").tolist() == [
        [0, 0, 128],
        [128, 255, 128],
        [128, 0, 0],
    ]


@pytest.mark.parametrize("name", COLORMAPS)
def test_every_colormap_is_uint8_rgb(name):
    out = apply_colormap(np.linspace(0, 1, 11), name)
    assert out.shape == (11, 3) and out.dtype == np.uint8


def test_bad_arguments():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="colormap"):
        overlay_mask(img, torch.zeros(2, 2), colormap="nope")
    with pytest.raises(ValueError, match="alpha"):
        overlay_mask(img, torch.zeros(2, 2), alpha=1.5)
    with pytest.raises(ValueError, match="2D"):
        overlay_mask(img, torch.zeros(2, 2, 2))
    with pytest.raises(TypeError):
        overlay_mask(np.zeros((8, 8, 3)), torch.zeros(2, 2))
