"""What the inference protocols share over HTTP: the body limit, the
``{"error": ...}`` shape of every refusal, one readiness answer for KServe v1 and OIP v2, and
bodies parsed and checked off the event loop before FastAPI."""

from __future__ import annotations

import base64
import math

import pytest
from fastapi.testclient import TestClient

from app.http.protocols.base import json_body_limit


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_json_body_limit_holds_every_image_at_the_upload_limit() -> None:
    limit = json_body_limit(max_upload_bytes=3000, max_images=4, overhead=100)
    assert limit == 4 * math.ceil(3000 / 3) * 4 + 100
    assert len(b64(b"x" * 3000)) * 4 + 100 == limit


def test_every_refusal_of_a_protocol_route_is_error_and_message(client: TestClient) -> None:
    for response, status in (
        (client.post("/v2/models/tiny/infer", json={"inputs": "x"}), 400),  # validation
        (client.get("/v2/models/nope"), 404),  # a domain error
        (client.get("/v1/models/nope"), 404),
    ):
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str), body


@pytest.mark.parametrize("route", ["/v1/models/{name}", "/v2/models/{name}/ready"])
def test_one_readiness_answer_for_both_protocols(client: TestClient, route: str) -> None:
    ready = client.get(route.format(name="tiny"))
    assert (ready.status_code, ready.json()) == (200, {"name": "tiny", "ready": True})
    broken = client.get(route.format(name="broken"))
    assert (broken.status_code, broken.json()) == (503, {"name": "broken", "ready": False})
    assert client.get(route.format(name="nope")).status_code == 404
