"""A request by a name the service does not answer to (a site rebound to this machine: DNS
rebinding) is refused; addresses and the service's own names are not (in Chromium:
tests/browser/test_page_security.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.http.middleware.allowed_hosts import allowed_hosts, is_address, is_loopback
from app.settings import Settings
from tests.conftest import files, image_bytes


def by_address(make_client: Callable[..., TestClient], **changes: Any) -> TestClient:
    """A service with these settings, called by its address (TestClient's own host name,
    "testserver", is not one it need answer to)."""
    return make_client(base_url="http://127.0.0.1", **changes)


def test_a_rebound_name_is_refused(make_client: Callable[..., TestClient]) -> None:
    client = by_address(make_client, host="127.0.0.1", allowed_hosts=[])
    rebound = {"Host": "rebound.test:8000"}
    for answer in (
        client.get("/models", headers=rebound),
        client.get("/", headers={**rebound, "Accept": "text/html"}),
        client.post(  # the gate would let it through: Origin and Host name the same site
            "/explain",
            headers={**rebound, "Origin": "http://rebound.test:8000"},
            files=files(image_bytes()),
        ),
    ):
        assert answer.status_code == 403, answer.text
        error = answer.json()["error"]
        assert error["code"] == "host_not_allowed"
        assert "'rebound.test:8000'" in error["message"]
        assert "CAMSERVE_ALLOWED_HOSTS" in error["message"]


@pytest.mark.parametrize(
    "host",
    ["localhost:8000", "camserve.localhost", "127.0.0.1:8000", "127.1.2.3", "[::1]:8000",
     "10.1.2.3:8000", "[2001:db8::1]"],
)  # fmt: skip
def test_addresses_and_loopback_names_are_answered(
    make_client: Callable[..., TestClient], host: str
) -> None:
    client = by_address(make_client, host="127.0.0.1", allowed_hosts=[])
    assert client.get("/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    ("allowed", "bound", "host", "answered"),
    [
        ([], "0.0.0.0", "anything.example", True),  # beyond loopback, no names: any
        (["*"], "127.0.0.1", "anything.example", True),
        (["camserve.example", "*.corp.example"], "0.0.0.0", "camserve.example", True),
        (["camserve.example", "*.corp.example"], "0.0.0.0", "gpu.corp.example:443", True),
        (["camserve.example", "*.corp.example"], "0.0.0.0", "corp.example", False),
        (["camserve.example", "*.corp.example"], "0.0.0.0", "camserve.example.evil", False),
        (["camserve.example"], "0.0.0.0", "localhost:8000", True),
        (["camserve.example"], "0.0.0.0", "10.0.0.7:8000", True),  # a probe by the pod's IP
        (["camserve.example"], "127.0.0.1", "CamServe.Example.", True),
        ([], "::1", "rebound.test", False),
        ([], "localhost", "rebound.test", False),
        ([], "127.0.0.1", "[bad", False),  # no host at all
    ],
)
def test_allowed_hosts_name_what_the_service_answers_to(
    make_client: Callable[..., TestClient],
    allowed: list[str],
    bound: str,
    host: str,
    answered: bool,
) -> None:
    client = by_address(make_client, host=bound, allowed_hosts=allowed)
    status = client.get("/models", headers={"Host": host}).status_code
    assert (status == 200) is answered, status


def test_the_setting_is_read_and_checked() -> None:
    settings = Settings(allowed_hosts="Camserve.Example, *.corp.example ,[::1],")  # type: ignore[arg-type]
    assert settings.allowed_hosts == ["camserve.example", "*.corp.example", "::1"]
    for bad in ("a b", "http://camserve.example", "host:8000", "*camserve.example"):
        with pytest.raises(ValidationError):
            Settings(allowed_hosts=bad)  # type: ignore[arg-type]
    assert allowed_hosts([], "0.0.0.0") is None and allowed_hosts(["*"], "127.0.0.1") is None
    assert allowed_hosts([], "127.0.0.1") == ()
    assert is_loopback("127.9.9.9") and is_loopback("[::1]") and not is_loopback("10.0.0.1")
    assert is_address("[::1]") and is_address("10.0.0.1") and not is_address("localhost")


def test_a_request_without_a_host_is_no_browsers_and_is_answered(
    make_client: Callable[..., TestClient],
) -> None:
    # HTTP/1.0 allows it; a browser always sends Host.
    client = by_address(make_client, host="127.0.0.1", allowed_hosts=[])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.0", "method": "GET",
        "scheme": "http", "path": "/health", "raw_path": b"/health", "query_string": b"",
        "root_path": "", "headers": [], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
    assert sent[0]["status"] == 200
