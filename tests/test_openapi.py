"""The OpenAPI schema says what the service really requires."""

from __future__ import annotations

from collections.abc import Callable

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
    assert len(bodies) == 2
    for body in bodies:
        assert body["required"] == ["file"]
        assert body["properties"]["file"]["minItems"] == 1
