"""Request-scoped dependencies: the one API-key comparison and who a client is."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.requests import Request

from app.http import deps
from app.http.middleware import gate
from app.settings import Settings
from tests.conftest import assert_error, files, image_bytes


@pytest.mark.parametrize("key", ["sécret", "ключ", "k"])
def test_a_key_works_in_any_script(make_client: Callable[..., TestClient], key: str) -> None:
    client = make_client(api_key=key)
    sent = {"X-API-Key": key.encode("utf-8")}
    assert client.get("/models", headers=sent).status_code == 200  # gate and dependency
    response = client.post("/predict", files=files(image_bytes()), headers=sent)
    assert response.status_code == 200, response.text
    wrong = {"X-API-Key": (key + "x").encode("utf-8")}
    assert_error(client.get("/models", headers=wrong), 401, "unauthorized")
    # The same characters in another encoding are another key.
    if not key.isascii():
        latin = {"X-API-Key": key.encode("utf-16-le")}
        assert_error(client.get("/models", headers=latin), 401, "unauthorized")


def test_the_gate_and_the_routes_share_one_comparison() -> None:
    assert gate.api_key_matches is deps.api_key_matches
    assert deps.api_key_matches("sécret".encode(), "sécret")
    assert not deps.api_key_matches(None, "sécret")
    assert not deps.api_key_matches("sécret".encode("latin-1"), "sécret")


def _request(settings: Settings, key: bytes | None, host: str = "10.0.0.1") -> Request:
    class State:
        pass

    app = type("App", (), {"state": State()})()
    app.state.settings = settings
    headers = [(b"x-api-key", key)] if key is not None else []
    return Request({"type": "http", "headers": headers, "client": (host, 1), "app": app})


def test_a_client_is_its_key_when_one_is_required_else_its_address(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_key": SecretStr("k")})
    assert deps.client_identity(_request(keyed, b"k")).startswith("key:")
    assert deps.client_identity(_request(keyed, b"k")) != deps.client_identity(
        _request(keyed, b"j")
    )
    # Without a required key, a made-up one does not make a new client.
    assert deps.client_identity(_request(settings, b"made-up")) == "address:10.0.0.1"
    assert deps.client_identity(_request(settings, None, "10.0.0.2")) == "address:10.0.0.2"
