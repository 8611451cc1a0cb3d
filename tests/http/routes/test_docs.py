"""/docs and /redoc load their scripts and styles from the service, not from a CDN."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize(
    "path, assets",
    [
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"]),
        ("/redoc", ["redoc.standalone.js", "favicon.png"]),
    ],
)
def test_docs_use_local_assets(client: TestClient, path: str, assets: list[str]) -> None:
    page = client.get(path)
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls
    for asset in assets:
        assert f"/static/docs/{asset}" in urls
        response = client.get(f"/static/docs/{asset}")
        assert response.status_code == 200 and len(response.content) > 1000


def test_redoc_refuses_outside_pictures(client: TestClient) -> None:
    policy = client.get("/redoc").headers["content-security-policy"]
    assert "; img-src 'self' data: blob:;" in policy
