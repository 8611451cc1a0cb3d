"""Every answer tells a browser not to sniff, frame or run it; the page and the API docs get a
policy under which only their own scripts run (the page in Chromium: tests/browser)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient

from app.http.middleware.security_headers import API_POLICY
from tests.conftest import files, image_bytes

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # what a browser sends


def policy(response: httpx.Response) -> dict[str, str]:
    """The Content-Security-Policy as directive -> sources."""
    parts = (
        p.strip().split(" ", 1) for p in response.headers["content-security-policy"].split(";")
    )
    return {name: value for name, value in parts}


def assert_guarded(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert policy(response)["frame-ancestors"] == "'none'"


def test_every_kind_of_answer_is_guarded(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_header_fields=50)
    answers = [
        client.get("/models"),
        client.get("/models/<img src=x onerror=alert(1)>", headers=HTML),  # echoes the name
        client.post("/explain", files=files(image_bytes()), data={"output": "overlay"}),
        client.post("/explain", files=files(image_bytes()), headers={"Accept": "image/png"}),
        client.get("/ui/page.js"),
        client.get("/metrics"),
        client.get("/health", headers=httpx.Headers([(f"x-h{i}", "v") for i in range(60)])),
        client.head("/health"),
    ]
    assert [a.status_code for a in answers] == [200, 404, 200, 200, 200, 200, 431, 200]
    assert answers[3].headers["content-type"] == "image/png"
    for answer in answers:
        assert_guarded(answer)
        assert answer.headers["content-security-policy"] == API_POLICY
    # An error that echoes its input stays JSON, for a browser too.
    assert answers[1].headers["content-type"] == "application/json"


def test_the_page_runs_only_its_own_files(client: TestClient) -> None:
    page = client.get("/", headers=HTML)
    assert page.headers["content-type"].startswith("text/html")
    assert_guarded(page)
    rules = policy(page)
    assert rules["script-src"] == "'self'" and rules["style-src"] == "'self'"
    assert rules["default-src"] == "'self'" and rules["connect-src"] == "'self'"
    assert rules["object-src"] == rules["base-uri"] == "'none'"
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline to allow


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_run_their_own_inline_script_and_no_other(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert_guarded(page)
    rules = policy(page)
    inline = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    hashes = {
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline
    }
    assert set(rules["script-src"].split()) == {"'self'", *hashes}
    assert (
        "'unsafe-inline'" not in rules["script-src"] and "'unsafe-eval'" not in rules["script-src"]
    )
    # Pictures only from the service: ReDoc's CDN logo is never asked for (Redocly/redoc#2108).
    assert rules["img-src"] == "'self' data: blob:"
    assert (path == "/docs") == bool(hashes)  # Swagger UI is started by an inline script
