"""Images as the protocols carry them -> uploads: base64, raw bytes, UINT8 pixel tensors."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.errors import BadRequest, ImageTooLarge, InvalidParameter, PayloadTooLarge
from app.protocols.images import decode_images, pixel_images
from app.settings import Settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def limits(store: Path) -> Settings:
    return Settings(model_store=store, max_upload_bytes=1024, max_images=2)


def test_base64_images_become_uploads(limits: Settings) -> None:
    uploads = decode_images([("a", b64(b"first")), ("b", b64(b"sec\nond")[:4] + "\n")], limits)
    assert [(u.filename, u.data) for u in uploads] == [("a", b"first"), ("b", b"sec")]


def test_what_the_protocols_refuse(limits: Settings) -> None:
    with pytest.raises(BadRequest, match="No image sent"):
        decode_images([], limits)
    with pytest.raises(InvalidParameter, match="CAMSERVE_MAX_IMAGES"):
        decode_images([("a", "")] * 3, limits)
    with pytest.raises(BadRequest, match="'a' is not valid base64"):
        decode_images([("a", "not base64!")], limits)
    with pytest.raises(PayloadTooLarge, match="CAMSERVE_MAX_UPLOAD_BYTES"):
        decode_images([("a", b64(b"x" * 1025))], limits)


def test_raw_bytes_are_taken_as_they_are(limits: Settings) -> None:
    uploads = decode_images([("a", b"\x89PNG raw"), ("b", b64(b"text"))], limits)
    assert [u.data for u in uploads] == [b"\x89PNG raw", b"text"]
    with pytest.raises(PayloadTooLarge, match="CAMSERVE_MAX_UPLOAD_BYTES"):
        decode_images([("a", b"x" * 1025)], limits)


def test_pixel_tensors_become_one_lossless_image_each(store: Path) -> None:
    settings = Settings(model_store=store, max_images=4)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    uploads = pixel_images("image", [-1, 5, 7, 3], pixels.tobytes(), settings)
    assert len(uploads) == 2
    for upload, image in zip(uploads, pixels, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(upload.data))), image)


@pytest.mark.parametrize(
    ("shape", "size", "error", "match"),
    [
        ([1, 5, 7], 105, BadRequest, "N, H, W, 3"),
        ([1, 5, 7, 4], 140, BadRequest, "N, H, W, 3"),
        ([2, 5, 7, 3], 105, BadRequest, "105 bytes"),
        ([-1, 5, 7, 3], 100, BadRequest, "100 bytes"),
        ([5, 1, 1, 3], 15, InvalidParameter, "CAMSERVE_MAX_IMAGES"),
        ([1, 100, 100, 3], 30_000, ImageTooLarge, "CAMSERVE_MAX_IMAGE_PIXELS"),
        ([4, 60, 60, 3], 43_200, ImageTooLarge, "CAMSERVE_MAX_REQUEST_PIXELS"),
    ],
)
def test_pixel_tensors_are_checked_before_any_image_is_made(
    store: Path, shape: list[int], size: int, error: type[Exception], match: str
) -> None:
    settings = Settings(
        model_store=store, max_images=4, max_image_pixels=5000, max_request_pixels=10_000
    )
    with pytest.raises(error, match=match):
        pixel_images("image", shape, bytes(size), settings)
