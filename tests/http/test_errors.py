"""How errors become answers: the app's handlers, refusals from middleware, and raw responses
from the server, all in one shape with the code of the domain error."""

from __future__ import annotations

import asyncio
import json

from fastapi.testclient import TestClient
from starlette.types import Message

from app.errors import HeaderTimeout, ShuttingDown
from app.http.errors import raw_refusal, send_refusal
from tests.conftest import assert_error


def test_raw_refusal_is_a_whole_http_response() -> None:
    raw = raw_refusal(HeaderTimeout("Headers late.", headers={"Retry-After": "2"}))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 408 Request Timeout"
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    assert fields[b"content-type"] == b"application/json"
    assert fields[b"content-length"] == str(len(body)).encode()
    assert fields[b"connection"] == b"close"
    assert fields[b"retry-after"] == b"2"
    assert json.loads(body) == {"error": {"code": "header_timeout", "message": "Headers late."}}


def test_send_refusal_in_both_shapes() -> None:
    error = ShuttingDown("Draining.", headers={"Retry-After": "1"})
    for protocol, expected in (
        (False, {"error": {"code": "shutting_down", "message": "Draining."}}),
        (True, {"error": "Draining."}),
    ):
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)  # noqa: B023 - consumed within the iteration

        asyncio.run(send_refusal(send, error, protocol=protocol))
        assert sent[0]["status"] == 503
        assert (b"retry-after", b"1") in sent[0]["headers"]
        assert json.loads(sent[1]["body"]) == expected


def test_validation_errors_name_each_field(client: TestClient) -> None:
    message = assert_error(client.post("/predict", data={"top_k": "1"}), 422, "validation_error")
    assert "file: is required: attach an image file" in message
    assert message.endswith("See /docs for the accepted parameters.")


def test_framework_refusals_take_the_codes_of_the_table(client: TestClient) -> None:
    assert "see /docs" in assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.delete("/predict"), 405, "method_not_allowed")


def test_a_long_path_is_echoed_cut(client: TestClient) -> None:
    # A 404 or 405 names the path as the log does: cut to 1024 characters, with its length.
    path = "/" + "a" * 60_000
    for answer, status in ((client.get(path), 404), (client.delete("/health"), 405)):
        assert answer.status_code == status
        assert len(answer.content) < 2_000
    message = client.get(path).json()["error"]["message"]
    assert message.startswith("No route /aaa") and "(60001 characters)" in message
