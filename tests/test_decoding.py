"""Decoding uploads: large JPEGs decode at reduced scale, the model input stays exact."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.decoding import Upload, decode_upload
from app.imaging import preprocess_image
from app.manifest import parse_manifest

SHAPES = Path(__file__).resolve().parents[1] / "model_store" / "shapes"


def _jpeg(size: tuple[int, int], **save: object) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return parse_manifest(SHAPES)  # resize 128, crop 128


def test_large_jpeg_decodes_at_reduced_scale(spec) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_upload(Upload("big.jpg", _jpeg((4000, 3000))), spec, 10**8, 1024)
    assert decoded.original_size == (4000, 3000)
    assert decoded.image.size == (1000, 750)  # 1/4: enough for a 1024-px picture (<= 1.25x)
    assert tuple(decoded.tensor.shape) == (3, 128, 128)
    # The crop box is in the reduced image's pixels: about the centred 750x750 square (the
    # crop is rounded to whole pixels of the 171x128 resized image).
    assert abs(decoded.box.left - 125) < 6 and abs(decoded.box.right - decoded.box.left - 750) < 2


def test_the_model_input_never_comes_from_too_small_a_decode(spec) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_upload(Upload("big.jpg", _jpeg((4000, 3000))), spec, 10**8, 0)
    assert min(decoded.image.size) >= 128
    full = Image.open(io.BytesIO(_jpeg((4000, 3000)))).convert("RGB")
    exact, _ = preprocess_image(full, spec)
    # A DCT-scaled decode differs from a full decode + resize by a little, not by a lot.
    assert float((decoded.tensor - exact).abs().mean()) < 0.05


def test_original_size_decodes_the_whole_image(spec) -> None:  # type: ignore[no-untyped-def]
    decoded = decode_upload(Upload("big.jpg", _jpeg((4000, 3000))), spec, 10**8, None)
    assert decoded.image.size == (4000, 3000)


def test_small_and_non_jpeg_uploads_decode_whole(spec) -> None:  # type: ignore[no-untyped-def]
    assert decode_upload(Upload("s.jpg", _jpeg((640, 480))), spec, 10**8, 1024).image.size == (
        640,
        480,
    )
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buffer, format="PNG")
    png = decode_upload(Upload("p.png", buffer.getvalue()), spec, 10**8, 1024)
    assert png.image.size == (3000, 2000)


def test_rotated_jpeg_reports_its_upright_size(spec) -> None:  # type: ignore[no-untyped-def]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = _jpeg((4000, 3000), exif=exif.tobytes())
    decoded = decode_upload(Upload("r.jpg", data), spec, 10**8, 1024)
    assert decoded.original_size == (3000, 4000)
    assert decoded.image.size == (750, 1000)
