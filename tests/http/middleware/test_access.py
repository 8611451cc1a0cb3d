"""Request ids on every answer, in error bodies and log lines; one access line per request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from app.http.middleware.access import AccessMiddleware
from app.observability.context import RequestIdFilter, current_request, valid_request_id
from app.observability.logs import JsonFormatter, TextFormatter
from app.pipeline import explainer as explainer_module
from app.settings import Settings
from tests.conftest import files, image_bytes, wait_ready

HEX32 = r"[0-9a-f]{32}"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger's records as JSON lines, through the service's own filter and format."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(saved)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("value", ["abc-123", "x" * 128, "a.b_c:d/e=f!~"])
def test_a_valid_id_is_echoed(client: TestClient, value: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": value})
    assert response.headers["x-request-id"] == value


@pytest.mark.parametrize("value", ["", " ", "x" * 129, "has space", "tab\tin", "é"])
def test_an_invalid_id_is_replaced(client: TestClient, value: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": value.encode("utf-8")})
    assert response.status_code == 200
    assert response.headers["x-request-id"] != value
    assert valid_request_id(response.headers["x-request-id"])


def test_ids_are_generated_and_unique(client: TestClient) -> None:
    ids = {client.get("/health").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5
    for request_id in ids:
        assert len(request_id) == 32 and int(request_id, 16) >= 0


def test_errors_carry_the_id_in_header_and_details(client: TestClient) -> None:
    for response in (
        client.post(
            "/predict",
            files=files(image_bytes()),
            data={"model": "nope"},
            headers={"X-Request-ID": "r-1"},
        ),
        client.post("/predict", headers={"X-Request-ID": "r-1"}),
        client.get("/no/such/route", headers={"X-Request-ID": "r-1"}),
        client.post("/predict", files=files(b"junk"), headers={"X-Request-ID": "r-1"}),
    ):
        assert response.is_error
        assert response.headers["x-request-id"] == "r-1"
        assert response.json()["error"]["details"]["request_id"] == "r-1"


def test_body_limit_413_carries_the_id(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_upload_bytes=1024, max_images=1)
    response = client.post(
        "/predict", files=files(b"x" * 200_000), headers={"X-Request-ID": "big-1"}
    )
    assert response.status_code == 413
    assert response.headers["x-request-id"] == "big-1"
    assert response.json()["error"]["details"]["request_id"] == "big-1"


def test_an_opaque_500_carries_the_id(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.http.app import create_app

    async def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(explainer_module.Explainer, "predict", boom)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post(
            "/predict", files=files(image_bytes()), headers={"X-Request-ID": "crash-1"}
        )
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "crash-1"
    assert response.json()["error"]["details"] == {"request_id": "crash-1"}


def test_every_log_line_of_a_request_has_its_id(client: TestClient, json_log: io.StringIO) -> None:
    # The broken model's 503 is logged as a warning by the error handler, inside the request.
    response = client.post(
        "/predict",
        files=files(image_bytes()),
        data={"model": "broken"},
        headers={"X-Request-ID": "log-1"},
    )
    assert response.status_code == 503
    records = lines(json_log)
    mine = [r for r in records if r.get("request_id") == "log-1"]
    assert {r["logger"] for r in mine} == {"app.http.errors", "app.http.middleware.access"}
    assert all(
        "request_id" in r
        for r in records
        if r["logger"] in ("app.http.errors", "app.http.middleware.access")
    )


def test_one_access_line_per_request(client: TestClient, json_log: io.StringIO) -> None:
    data = image_bytes()
    response = client.post(
        "/explain",
        files=files(data, data),
        data={"method": "gradcam", "output": "raw"},
        headers={"X-Request-ID": "acc-1"},
    )
    assert response.status_code == 200
    (line,) = [r for r in lines(json_log) if r["logger"] == "app.http.middleware.access"]
    assert line["request_id"] == "acc-1"
    assert line["http_method"] == "POST" and line["path"] == "/explain"
    assert line["status"] == 200 and line["ms"] > 0
    assert (line["model"], line["method"], line["images"]) == ("tiny", "GradCAM", 2)
    assert line["bytes"] == response.num_bytes_downloaded  # on the wire: gzipped here
    assert line["bytes_in"] > 2 * len(data)


def test_access_line_of_a_route_without_model(client: TestClient, json_log: io.StringIO) -> None:
    client.get("/health")
    (line,) = [r for r in lines(json_log) if r["logger"] == "app.http.middleware.access"]
    assert (line["path"], line["status"], line["model"], line["method"]) == (
        "/health",
        200,
        None,
        None,
    )
    assert line["images"] == 0


def test_a_long_path_is_cut_in_the_access_line(client: TestClient, json_log: io.StringIO) -> None:
    """A path runs up to CAMSERVE_MAX_HEADER_BYTES; its access line carried it whole (found by a
    hostile review: a 60,000-character path made a 60,151-character line, one per request)."""
    assert client.get("/" + "a" * 59_999).status_code == 404
    (line,) = [r for r in lines(json_log) if r["logger"] == "app.http.middleware.access"]
    assert line["path"] == "/" + "a" * 1023 + "... (60000 characters)"
    assert (
        line["message"].startswith("GET /aaa") and "... (60000 characters) 404 " in line["message"]
    )
    ours = [line for line in json_log.getvalue().splitlines() if '"logger": "app.' in line]
    assert ours and all(len(line) < 3000 for line in ours)  # the path twice, cut


def test_text_format_tags_request_lines_only() -> None:
    record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello", (), None)
    record.request_id = "t-1"
    assert "app.x [t-1]: hello" in TextFormatter().format(record)
    plain = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello", (), None)
    RequestIdFilter().filter(plain)  # outside a request
    assert "app.x: hello" in TextFormatter().format(plain)


def test_a_request_is_its_peers_client_for_the_per_client_rules() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        info = current_request()
        assert info is not None
        seen.append(info.caller)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        pass

    middleware = AccessMiddleware(app)
    for client in [("10.1.2.3", 5000), None]:
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": client}
        asyncio.run(middleware(scope, receive, send))
    assert seen == ["address:10.1.2.3", "address:unknown"]
