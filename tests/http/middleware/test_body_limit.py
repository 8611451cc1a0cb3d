"""The body limit: 413 past the size (declared or counted), 408 when the body stalls, in the
shape of the route's family; bodies within the limits pass untouched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from app.http.middleware.body_limit import BodyLimitMiddleware
from tests.conftest import assert_error


class ReadingApp:
    """Reads the whole body, then answers 200 with its length (or lets the read's error out,
    as an app would)."""

    def __init__(self) -> None:
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            self.read += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = str(self.read).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def run(
    middleware: BodyLimitMiddleware,
    chunks: list[bytes | None],
    path: str = "/explain",
    content_length: int | None = None,
) -> dict[str, Any]:
    """Send ``chunks`` as the body (``None``: the client pauses for good); the answer."""
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    pending = list(chunks)
    sent: list[Message] = []

    async def receive() -> Message:
        chunk = pending.pop(0)
        if chunk is None:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": sent[0]["status"], "headers": dict(sent[0]["headers"]), "body": body}


def limited(app: ReadingApp, **kwargs: Any) -> BodyLimitMiddleware:
    return BodyLimitMiddleware(
        app, max_bytes=100, protocol_prefixes=("/v2/",), protocol_max_bytes=200, **kwargs
    )


def test_a_body_within_the_limit_passes_untouched() -> None:
    app = ReadingApp()
    answer = run(limited(app), [b"x" * 60, b"x" * 40], content_length=100)
    assert (answer["status"], answer["body"]) == (200, b"100")


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    app = ReadingApp()
    answer = run(limited(app), [b"x"], content_length=101)
    error = json.loads(answer["body"])["error"]
    assert answer["status"] == 413 and error["code"] == "payload_too_large"
    assert "100 bytes" in error["message"] and "CAMSERVE_MAX_UPLOAD_BYTES" in error["message"]
    assert answer["headers"][b"connection"] == b"close"
    assert app.read == 0


def test_a_counted_body_over_the_limit_replaces_the_apps_answer() -> None:
    app = ReadingApp()
    answer = run(limited(app), [b"x" * 60, b"x" * 60, b"x" * 60])
    assert answer["status"] == 413
    assert json.loads(answer["body"])["error"]["code"] == "payload_too_large"


def test_protocol_paths_have_their_own_limit_and_shape() -> None:
    app = ReadingApp()
    assert run(limited(app), [b"x" * 150], path="/v2/models/m/infer")["status"] == 200
    answer = run(limited(app), [b"x" * 250], path="/v2/models/m/infer", content_length=250)
    assert answer["status"] == 413
    assert set(json.loads(answer["body"])) == {"error"}  # {"error": "message"}


def test_a_stalled_body_is_answered_408() -> None:
    app = ReadingApp()
    answer = run(limited(app, body_timeout_s=0.05), [b"x" * 10, None])
    error = json.loads(answer["body"])["error"]
    assert answer["status"] == 408 and error["code"] == "body_timeout"
    assert "CAMSERVE_BODY_TIMEOUT_S" in error["message"]


def test_streamed_body_over_limit_is_cut(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_upload_bytes=1024, max_images=1)

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b"--x\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"
        for _ in range(200):  # 200 KiB, over 1 KiB + the 64 KiB allowance for form fields
            yield b"\0" * 1024

    response = client.post(
        "/explain", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert_error(response, 413, "payload_too_large")
