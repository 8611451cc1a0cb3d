"""The upload limits of every route that takes images (multipart forms and the inference
protocols alike), and how their refusals read."""

from __future__ import annotations

from app.errors import InvalidParameter, PayloadTooLarge, clip
from app.settings import Settings


def check_count(count: int, settings: Settings) -> None:
    """At most ``CAMSERVE_MAX_IMAGES`` images in one request."""
    if count > settings.max_images:
        raise InvalidParameter(
            f"{count} images sent but at most {settings.max_images} are accepted per "
            "request (CAMSERVE_MAX_IMAGES); split the batch."
        )


def check_size(name: str, size: int, settings: Settings) -> None:
    """At most ``CAMSERVE_MAX_UPLOAD_BYTES`` in one image (its name clipped in the message)."""
    if size > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"{clip(name)} is over the upload limit of {settings.max_upload_bytes} bytes "
            "(CAMSERVE_MAX_UPLOAD_BYTES); send a smaller image."
        )
