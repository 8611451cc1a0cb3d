"""Images as the protocols carry them -> uploads, under the limits of the multipart routes.

Three forms: base64 text (JSON bodies), raw encoded bytes (the binary tensor data extension,
gRPC's ``bytes_contents`` and ``raw_input_contents``), and UINT8 pixel tensors ``[N, H, W, 3]``.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.errors import BadRequest, ImageTooLarge, clip
from app.pipeline.decoding import Upload
from app.protocols import uploads
from app.settings import Settings

EXAMPLE_IMAGE_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfHgA0wMeAAg1MCANDKARQfGKMRAAAAAElF"
    "TkSuQmCC"
)
"""A whole 8x8 PNG, base64: the request examples of the schema work when sent as they are."""


def decode_images(encoded: Sequence[tuple[str, str | bytes]], settings: Settings) -> list[Upload]:
    """``(name, image)`` pairs -> uploads: a ``str`` is base64 text, ``bytes`` the encoded image
    itself. Refused: no image, too many, one over CAMSERVE_MAX_UPLOAD_BYTES (base64 is sized
    before it is decoded), text that is not base64."""
    if not encoded:
        raise BadRequest("No image sent; send at least one base64-encoded image.")
    uploads.check_count(len(encoded), settings)
    decoded = []
    for name, image in encoded:
        if isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
        else:
            data = _from_base64(name, image, settings)
        uploads.check_size(name, len(data), settings)
        decoded.append(Upload(filename=name, data=data))
    return decoded


def _from_base64(name: str, text: str, settings: Settings) -> bytes:
    compact = "".join(text.split())
    uploads.check_size(name, len(compact) // 4 * 3 - 2, settings)  # before decoding it
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"{clip(name)} is not valid base64 (standard alphabet, with padding)."
        ) from None


def pixel_images(name: str, shape: Sequence[int], data: bytes, settings: Settings) -> list[Upload]:
    """A UINT8 tensor of RGB pixels, ``[N, H, W, 3]`` row-major, -> one upload per image.

    The shape is checked against the data's length and the pixel limits before anything is
    built; each image becomes an uncompressed BMP, which the pipeline then decodes like any
    upload (so every per-image check applies to it as well)."""
    if len(shape) != 4 or shape[3] != 3 or any(dim == 0 for dim in shape):
        raise BadRequest(
            f"Input {clip(name)} of datatype UINT8 must have shape [N, H, W, 3] (RGB pixels); "
            f"got {list(shape)}."
        )
    count, height, width = shape[0], shape[1], shape[2]
    if height < 0 or width < 0:
        raise BadRequest(f"Input {clip(name)}: give the images' height and width in its shape.")
    per_image = height * width * 3
    if count < 0:
        count = len(data) // per_image if len(data) % per_image == 0 else -1
    if count < 1 or count * per_image != len(data):
        raise BadRequest(
            f"Input {clip(name)} has shape {list(shape)} but {len(data)} bytes of data; "
            f"[N, {height}, {width}, 3] takes N x {per_image} bytes."
        )
    uploads.check_count(count, settings)
    if height * width > settings.max_image_pixels:
        raise ImageTooLarge(
            f"Input {clip(name)}: {width}x{height} is over the {settings.max_image_pixels} "
            "pixels an image may have (CAMSERVE_MAX_IMAGE_PIXELS); downscale it."
        )
    if count * height * width > settings.max_request_pixels:
        raise ImageTooLarge(
            f"Input {clip(name)} holds {count * height * width} pixels in all, over the "
            f"{settings.max_request_pixels} one request may (CAMSERVE_MAX_REQUEST_PIXELS); "
            "send fewer or smaller images."
        )
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(count, height, width, 3)
    made = []
    for index, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="BMP")
        made.append(Upload(filename=f"{name}{index}", data=buffer.getvalue()))
    return made
