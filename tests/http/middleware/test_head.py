"""HEAD is answered wherever GET is: its status and headers, no body."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error


@pytest.mark.parametrize("path", ["/health", "/ready", "/models", "/metrics", "/v2", "/"])
def test_head_answers_as_get_without_the_body(client: TestClient, path: str) -> None:
    got = client.get(path)
    head = client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    if path != "/metrics":  # the metrics count requests, so their length moves between the two
        assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["x-request-id"]


def test_head_of_the_page_negotiates_as_get_does(client: TestClient) -> None:
    html = client.head("/", headers={"Accept": "text/html"})
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert html.content == b""


def test_head_where_get_is_not_answered_is_what_get_gets(client: TestClient) -> None:
    missing = client.head("/models/nope")
    assert missing.status_code == client.get("/models/nope").status_code == 404
    assert missing.content == b""
    # A POST route: GET is a 405 naming the methods allowed, and so is HEAD.
    assert_error(client.get("/explain"), 405, "method_not_allowed")
    refused = client.head("/explain")
    assert refused.status_code == 405 and refused.content == b""
    assert "POST" in refused.headers["allow"]


def _health_heads(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("camserve_requests_total{") and 'route="/health"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_head_is_counted_under_its_route(client: TestClient) -> None:
    before = _health_heads(client)
    client.head("/health")
    assert _health_heads(client) == before + 1  # not under "unmatched"
