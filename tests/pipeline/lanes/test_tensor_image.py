"""Image work on tensors agrees with the Pillow code of the CPU lane."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from app.models.manifest import parse_manifest
from app.pipeline.decoding import preprocess_image
from app.pipeline.lanes import tensor_image
from tests.pipeline.lanes.helpers import encoded, levels, mean_level_gap, photo

SHAPES = Path(__file__).resolve().parents[3] / "model_store" / "shapes"


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return parse_manifest(SHAPES)  # resize 128, crop 128


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_exif_transpose(orientation: int) -> None:
    stored = photo((40, 24))
    upright = ImageOps.exif_transpose(
        Image.open(__import__("io").BytesIO(encoded(stored, "PNG", orientation)))
    )
    turned = tensor_image.orient(levels(stored).to(torch.uint8), orientation)
    assert torch.equal(turned.float(), levels(upright))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(640, 480), (300, 700), (128, 128), (90, 60)])
def test_preprocess_matches_pillow(spec, interpolation: str, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    spec = dataclasses.replace(spec, interpolation=interpolation)
    image = photo(size)
    expected, box = preprocess_image(image, spec)
    got, got_box = tensor_image.preprocess(levels(image).to(torch.uint8), spec)
    assert got_box == box
    mean = torch.tensor(spec.mean).reshape(-1, 1, 1)
    std = torch.tensor(spec.std).reshape(-1, 1, 1)
    gap = mean_level_gap((got * std + mean) * 255, (expected * std + mean) * 255)
    assert gap <= 2.0


def test_grayscale_models_get_pillow_luma(spec) -> None:  # type: ignore[no-untyped-def]
    spec = dataclasses.replace(
        spec, input_shape=(1, *spec.input_shape[1:]), mean=(0.5,), std=(0.25,)
    )
    image = photo((200, 150))
    expected, _ = preprocess_image(image, spec)
    got, _ = tensor_image.preprocess(levels(image).to(torch.uint8), spec)
    assert got.shape == expected.shape == (1, *spec.crop)
    assert mean_level_gap(got * 0.25 * 255, expected * 0.25 * 255) <= 2.0


def test_resize_shrinks_like_pillow() -> None:
    image = photo((800, 600))
    expected = image.resize((200, 150), Image.Resampling.BILINEAR)
    got = tensor_image.resize(levels(image).to(torch.uint8), (200, 150))
    assert got.dtype == torch.uint8
    assert mean_level_gap(got, levels(expected)) <= 2.0
