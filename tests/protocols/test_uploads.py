"""The upload limits, one home for the form routes and the protocols; names clipped in errors."""

from __future__ import annotations

import base64
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.conftest import assert_error, image_bytes


def test_a_long_filename_is_clipped_in_every_refusal(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=1024, max_images=1)
    name = "n" * 1000 + ".png"
    big = image_bytes((64, 64))
    response = client.post("/predict", files=[("file", (name, big, "image/png"))])
    message = assert_error(response, 413, "payload_too_large")
    assert "1004 characters" in message and len(response.content) < 500
    response = client.post("/predict", files=[("file", (name, b"text", "image/png"))])
    assert len(assert_error(response, 415, "unsupported_media_type")) < 300


def test_the_form_and_the_protocols_share_the_limits(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_upload_bytes=1024, max_images=1)
    big, small = image_bytes((64, 64)), image_bytes((8, 8))
    form = client.post("/predict", files=[("file", ("a.png", big, "image/png"))])
    instances = {"instances": [{"image": {"b64": base64.b64encode(big).decode()}}]}
    kserve = client.post("/v1/models/tiny:predict", json=instances)
    assert "CAMSERVE_MAX_UPLOAD_BYTES" in assert_error(form, 413, "payload_too_large")
    assert "CAMSERVE_MAX_UPLOAD_BYTES" in kserve.json()["error"]
    two = [("file", (f"{i}.png", small, "image/png")) for i in range(2)]
    count = assert_error(client.post("/predict", files=two), 422, "invalid_parameter")
    tiny = {"image": {"b64": base64.b64encode(small).decode()}}
    protocol = client.post("/v1/models/tiny:predict", json={"instances": [tiny, tiny]})
    assert protocol.json()["error"] == count
