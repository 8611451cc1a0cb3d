"""The OpenAPI schema says what the service really requires."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient


def _operations(schema: dict) -> list[dict]:
    return [op for ops in schema["paths"].values() for op in ops.values()]


def test_no_key_configured_means_no_security_requirement(
    make_client: Callable[..., TestClient],
) -> None:
    schema = make_client().get("/openapi.json").json()
    assert all("security" not in op for op in _operations(schema))
    assert "securitySchemes" not in schema.get("components", {})


def test_a_configured_key_is_documented(make_client: Callable[..., TestClient]) -> None:
    schema = make_client(api_key="k").get("/openapi.json").json()
    secured = [op for op in _operations(schema) if op.get("security")]
    assert {op["operationId"].split("_")[0] for op in secured} >= {"explain", "predict"}
    assert "X-API-Key" in str(schema["components"]["securitySchemes"])


def test_file_parts_need_at_least_one_image(make_client: Callable[..., TestClient]) -> None:
    schemas = make_client().get("/openapi.json").json()["components"]["schemas"]
    bodies = [s for name, s in schemas.items() if name.startswith("Body_")]
    assert len(bodies) == 3  # /predict, /explain, /jobs
    for body in bodies:
        assert body["required"] == ["file"]
        assert body["properties"]["file"]["minItems"] == 1


@pytest.mark.parametrize("api_key", [None, "k"])
def test_form_fields_never_offer_null(
    make_client: Callable[..., TestClient], api_key: str | None
) -> None:
    schemas = make_client(api_key=api_key).get("/openapi.json").json()["components"]["schemas"]
    bodies = {name: s for name, s in schemas.items() if name.startswith("Body_")}
    assert bodies
    for name, body in bodies.items():
        text = json.dumps(body)
        assert '"null"' not in text and '"default": null' not in text, name
    explain = next(b for n, b in bodies.items() if "explain" in n)
    assert all(body["additionalProperties"] is False for body in bodies.values())  # refused
    assert explain["properties"]["method"]["type"] == "array"  # several methods: repeatable
    assert explain["properties"]["method"]["items"]["type"] == "string"
    assert explain["properties"]["num_samples"]["type"] == "integer"


def test_malformed_multipart_is_documented_and_answered_as_400(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    schema = client.get("/openapi.json").json()
    for path in ("/explain", "/predict", "/jobs"):
        assert "400" in schema["paths"][path]["post"]["responses"], path
    response = client.post(
        "/explain",
        content=b"not a multipart body",
        headers={"content-type": "multipart/form-data"},  # no boundary
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    assert "boundary" in response.json()["error"]["message"]
