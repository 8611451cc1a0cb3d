"""The cap on headers for servers other than ``python -m app`` (whose protocol applies the same
rule while the headers arrive: tests/http/test_server.py)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from fastapi.testclient import TestClient

from tests.conftest import assert_error


def test_too_many_or_too_large_headers_get_431(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_header_fields=50, max_header_bytes=8192)
    many = httpx.Headers([(f"x-h{i}", "v") for i in range(60)])
    message = assert_error(client.get("/health", headers=many), 431, "headers_too_large")
    assert "CAMSERVE_MAX_HEADER_FIELDS" in message
    large = {"x-big": "v" * 9000}
    assert_error(client.get("/health", headers=large), 431, "headers_too_large")
    # Under both caps: served.
    fine = httpx.Headers([(f"x-h{i}", "v" * 100) for i in range(40)])
    assert client.get("/health", headers=fine).status_code == 200
