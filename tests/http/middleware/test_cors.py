"""A refused CORS preflight answers in the service's JSON shape, naming what and the fix."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize(
    "origin, method, headers, words, detail",
    [
        (
            "http://evil.test",
            "POST",
            None,
            ["'http://evil.test'", "CAMSERVE_CORS_ORIGINS"],
            "origin",
        ),
        ("http://app.test", "PUT", None, ["'PUT'", "DELETE, GET, POST"], "allowed_methods"),
        ("http://app.test", "POST", "x-api-key,x-evil", ["x-evil", "x-api-key"], "refused_headers"),
    ],
)
def test_a_refused_preflight_is_json_naming_the_part_and_the_fix(
    make_client: Callable[..., TestClient],
    origin: str,
    method: str,
    headers: str | None,
    words: list[str],
    detail: str,
) -> None:
    client = make_client(cors_origins=["http://app.test"])
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        asked["Access-Control-Request-Headers"] = headers
    answer = client.options("/explain", headers=asked)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "preflight_refused"
    assert error["message"].startswith("The browser's preflight is refused: ")
    for word in words:
        assert word in error["message"]
    assert detail in error["details"] and error["details"]["request_id"]
    assert answer.headers["x-request-id"] == error["details"]["request_id"]
    assert "origin" in answer.headers["vary"].lower()  # Starlette's headers are kept


def test_every_refused_part_is_named_at_once(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=["http://app.test"])
    answer = client.options(
        "/explain",
        headers={
            "Origin": "http://evil.test",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "x-evil",
        },
    )
    message = answer.json()["error"]["message"]
    assert "origin" in message and "'PATCH'" in message and "x-evil" in message


def test_an_allowed_preflight_is_unchanged(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=["http://app.test"])
    answer = client.options(
        "/explain",
        headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST"},
    )
    assert answer.status_code == 200 and answer.text == "OK"
    assert answer.headers["access-control-allow-origin"] == "http://app.test"
