"""Pictures at the size asked for; outside the model's crop the upload shows plain."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import InvalidParameter
from app.pipeline.decoding import Box, DecodedImage
from app.pipeline.rendering import (
    OUTPUT_KINDS,
    NamedMap,
    PictureSize,
    RenderStyle,
    encode_image,
    render_image,
)


def _decoded(size: tuple[int, int], box: Box, color=(10, 200, 30)) -> DecodedImage:  # type: ignore[no-untyped-def]
    image = Image.new("RGB", size, color)
    return DecodedImage("x.png", image, size, torch.zeros(3, 8, 8), box)


def _picture(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, PictureSize("side", 1024, upscale=False)),
        ("", PictureSize("side", 1024, upscale=False)),
        ("original", PictureSize("original")),
        (" Input ", PictureSize("input")),
        ("512", PictureSize("side", 512)),
    ],
)
def test_size_values(value: str | None, expected: PictureSize) -> None:
    assert PictureSize.parse(value, 1024) == expected


@pytest.mark.parametrize("value", ["0", "15", "4097", "big", "-5", "1e3", "12.5", "x" * 5000])
def test_bad_sizes_name_the_allowed_values(value: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        PictureSize.parse(value, 1024)
    assert "original" in caught.value.message and "input" in caught.value.message
    assert len(caught.value.message) < 300  # a huge value is not echoed back whole


def test_canvas_sizes() -> None:
    crop = (224, 200)  # (h, w)
    assert PictureSize("side", 1024, upscale=False).canvas_size((4000, 3000), crop) == (1024, 768)
    assert PictureSize("side", 1024, upscale=False).canvas_size((300, 200), crop) == (300, 200)
    assert PictureSize("side", 600).canvas_size((300, 200), crop) == (600, 400)
    assert PictureSize("side", 100).canvas_size((100, 3000), crop) == (3, 100)
    assert PictureSize("original").canvas_size((4000, 3000), crop) == (4000, 3000)
    assert PictureSize("input").canvas_size((4000, 3000), crop) == (200, 224)


def test_outside_the_crop_the_overlay_is_the_plain_image() -> None:
    decoded = _decoded((80, 40), Box(20, 0, 60, 40))
    maps = [NamedMap("layer", "layer", torch.ones(1, 4, 4), True)]
    style = RenderStyle(outputs=("overlay", "heatmap"), image_format="png", alpha=0.5)
    (fields,) = render_image(decoded, 0, maps, style, (40, 40))
    assert (fields["width"], fields["height"], fields["region"]) == (80, 40, [20, 0, 60, 40])
    overlay = np.asarray(_picture(fields["overlay"]).convert("RGB")).astype(int)
    assert (overlay[:, :20] == [10, 200, 30]).all() and (overlay[:, 60:] == [10, 200, 30]).all()
    # Inside: half the image, half jet's top colour (128, 0, 0), rounded to nearest.
    assert (overlay[:, 20:60] == [69, 100, 15]).all()
    heat = _picture(fields["heatmap"])
    assert heat.mode == "RGBA"
    alpha = np.asarray(heat)[..., 3]
    assert (alpha[:, :20] == 0).all() and (alpha[:, 20:60] == 255).all()


def test_sizes_scale_pictures_and_region() -> None:
    decoded = _decoded((400, 200), Box(100, 0, 300, 200))
    maps = [NamedMap("layer", "layer", torch.rand(1, 4, 4), True)]
    for size, expected in [("100", (100, 50)), ("input", (32, 32)), ("original", (400, 200))]:
        style = RenderStyle(outputs=("overlay",), size=PictureSize.parse(size, 1024))
        (fields,) = render_image(decoded, 0, maps, style, (32, 32))
        assert _picture(fields["overlay"]).size == expected
        assert (fields["width"], fields["height"]) == expected
    style = RenderStyle(outputs=("overlay",), size=PictureSize.parse("100", 1024))
    assert render_image(decoded, 0, maps, style, (32, 32))[0]["region"] == [25, 0, 75, 50]


def test_a_full_crop_heatmap_is_a_lossless_palette_png() -> None:
    decoded = _decoded((16, 16), Box(0, 0, 16, 16))
    cam = torch.linspace(0, 1, 16).repeat(16, 1)[None]
    style = RenderStyle(outputs=("heatmap",), image_format="png", colormap="gray")
    (fields,) = render_image(decoded, 0, [NamedMap("l", "layer", cam, True)], style, (16, 16))
    heat = _picture(fields["heatmap"])
    assert heat.mode == "P"
    row = np.asarray(heat.convert("RGB"))[0, :, 0]
    assert row.tolist() == np.round(np.linspace(0, 255, 16)).astype(int).tolist()


def test_raw_only_draws_nothing() -> None:
    decoded = _decoded((16, 16), Box(0, 0, 16, 16))
    style = RenderStyle(outputs=("raw",))
    (fields,) = render_image(
        decoded, 0, [NamedMap("l", "layer", torch.rand(1, 2, 3), False)], style, (16, 16)
    )
    assert fields["width"] is None and fields["raw"].shape == [2, 3]
    assert set(OUTPUT_KINDS) == {"overlay", "heatmap", "raw"}


def test_encode_formats() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        assert encode_image(image, fmt).startswith(magic)
