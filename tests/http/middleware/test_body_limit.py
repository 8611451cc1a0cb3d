"""The body limit: 413 past the size (declared or counted), 408 when the body stalls, comes too
late as a whole or too slowly, in the shape of the route's family; bodies within the limits pass
untouched."""

from __future__ import annotations

import asyncio
import json
import time
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
    content_length: int | bytes | None = None,
    content_type: bytes | None = None,
) -> dict[str, Any]:
    """Send ``chunks`` as the body (``None``: the client pauses for good); the answer."""
    declared = str(content_length).encode() if isinstance(content_length, int) else content_length
    headers = [] if declared is None else [(b"content-length", declared)]
    if content_type is not None:
        headers.append((b"content-type", content_type))
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


def test_a_declared_length_with_thousands_of_leading_zeros_is_read_as_its_number() -> None:
    """HTTP servers take ``Content-Length: 000...0100`` as 100; ``int`` refused its 5,003
    digits, and the middleware answered 500 (found by a hostile review)."""
    zeros = b"0" * 5000
    answer = run(limited(ReadingApp()), [b"x" * 100], content_length=zeros + b"100")
    assert (answer["status"], answer["body"]) == (200, b"100")
    refused = run(limited(ReadingApp()), [b"x" * 101], content_length=zeros + b"101")
    assert refused["status"] == 413


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


async def _read_all(scope: Scope, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _run(middleware: BodyLimitMiddleware, pieces: int, every_s: float) -> tuple[int, Any, float]:
    """Send ``pieces`` pieces of 4 bytes, one every ``every_s`` s; the status, body, seconds."""
    sent: list[Message] = []

    async def main() -> float:
        count = 0

        async def receive() -> Message:
            nonlocal count
            await asyncio.sleep(every_s)
            count += 1
            return {"type": "http.request", "body": b"abcd", "more_body": count < pieces}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
        started = time.monotonic()
        await middleware(scope, receive, send)
        return time.monotonic() - started

    seconds = asyncio.run(main())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    status = sent[0]["status"]
    return status, json.loads(body) if status != 200 else body, seconds


def test_a_trickle_is_cut_once_its_pace_is_too_slow() -> None:
    # 4 bytes every 20 ms (200 B/s) never pauses long, but is under 1000 B/s after 0.2 s.
    limit = BodyLimitMiddleware(_read_all, 10**6, body_timeout_s=60, min_rate=1000, grace_s=0.2)
    status, body, seconds = _run(limit, pieces=1000, every_s=0.02)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert "bytes/s" in body["error"]["message"]
    assert "CAMSERVE_BODY_MIN_RATE" in body["error"]["message"]
    assert seconds < 5  # cut long before its 1000 pieces (20 s) were sent


def test_the_whole_body_has_a_deadline() -> None:
    limit = BodyLimitMiddleware(_read_all, 10**6, body_timeout_s=0.3, min_rate=0)
    status, body, seconds = _run(limit, pieces=1000, every_s=0.02)
    assert status == 408 and "CAMSERVE_BODY_TIMEOUT_S" in body["error"]["message"]
    assert seconds < 5


def test_a_steady_body_passes() -> None:
    limit = BodyLimitMiddleware(_read_all, 10**6, body_timeout_s=10, min_rate=100, grace_s=0.1)
    assert _run(limit, pieces=10, every_s=0.01)[0] == 200


def test_a_pause_is_cut_at_the_pace_without_waiting_for_the_deadline() -> None:
    limit = BodyLimitMiddleware(_read_all, 10**6, body_timeout_s=60, min_rate=1000, grace_s=0.2)
    status, _, seconds = _run(limit, pieces=2, every_s=30)
    assert status == 408 and seconds < 5


def test_bodies_in_flight_share_one_budget() -> None:
    async def main() -> tuple[list[Message], list[Message], int]:
        release = asyncio.Event()

        async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        limit = BodyLimitMiddleware(slow_app, 10**6, budget=100)

        def call(length: int) -> tuple[Any, list[Message]]:
            sent: list[Message] = []

            async def receive() -> Message:
                return {"type": "http.request", "body": b"x" * length, "more_body": False}

            async def send(message: Message) -> None:
                sent.append(message)

            headers = [(b"content-length", str(length).encode())]
            scope = {"type": "http", "method": "POST", "path": "/p", "headers": headers}
            return limit(scope, receive, send), sent

        work, first = call(60)
        running = asyncio.create_task(work)
        await asyncio.sleep(0.01)
        work, second = call(60)
        await work  # 60 + 60 > 100: refused while the first holds its body
        release.set()
        await running
        held = limit.held
        work, third = call(60)
        await work
        return first + third, second, held

    answered, refused, held = asyncio.run(main())
    assert [m["status"] for m in answered if m["type"] == "http.response.start"] == [200, 200]
    assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
    assert "CAMSERVE_BODY_BUDGET_BYTES" in json.loads(refused[1]["body"])["error"]["message"]
    assert held == 0


def encoded(chunks: list[bytes], encoding: str, path: str = "/explain") -> dict[str, Any]:
    """Run ``chunks`` with ``Content-Encoding: encoding`` through a limited echo app."""
    seen: dict[str, Any] = {}

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        seen["app_headers"] = dict(scope["headers"])
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen["app_body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-encoding", encoding.encode()), (b"content-length", b"9")],
    }
    pending = list(chunks)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = BodyLimitMiddleware(
        echo, max_bytes=1000, protocol_prefixes=("/v2/",), protocol_max_bytes=1000
    )
    asyncio.run(middleware(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": sent[0]["status"], "body": body, **seen}


def test_gzip_and_deflate_bodies_reach_the_app_decompressed() -> None:
    import gzip
    import zlib

    original = b'{"inputs": []}' * 50
    for encoding, data in (
        ("gzip", gzip.compress(original)),
        ("x-gzip", gzip.compress(original)),
        ("deflate", zlib.compress(original)),
    ):
        cut = len(data) // 2
        answer = encoded([data[:cut], data[cut:]], encoding)
        assert (answer["status"], answer["app_body"]) == (200, original)
        assert answer["app_headers"].get(b"content-encoding") is None
        # Content-Length counted the compressed bytes
        assert answer["app_headers"].get(b"content-length") is None


def test_a_bomb_is_refused_once_its_output_passes_the_limit() -> None:
    import gzip

    bomb = gzip.compress(b"\0" * 100_000)  # 132 bytes that inflate to 100 kB
    assert len(bomb) < 1000
    answer = encoded([bomb], "gzip", path="/v2/models/m/infer")
    assert answer["status"] == 413
    assert "decompresses to over 1000 bytes" in json.loads(answer["body"])["error"]
    assert "app_body" not in answer  # the app never saw it whole


def test_other_encodings_and_broken_data_are_refused() -> None:
    import gzip

    answer = encoded([b"x"], "br", path="/v2/models/m/infer")
    assert answer["status"] == 415 and "gzip or deflate" in json.loads(answer["body"])["error"]
    answer = encoded([b"not gzip at all"], "gzip")
    assert answer["status"] == 400 and "not valid gzip" in answer["body"].decode()
    answer = encoded([gzip.compress(b"x" * 100)[:-10]], "gzip")
    assert answer["status"] == 400 and "truncated" in answer["body"].decode()


def test_the_budget_counts_a_bodys_decompressed_bytes() -> None:
    import gzip

    middleware = BodyLimitMiddleware(ReadingApp(), max_bytes=10_000, budget=5_000)
    packed = gzip.compress(b"a" * 8_000)  # 8 kB that travel as ~50 bytes
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/explain",
        "headers": [(b"content-encoding", b"gzip"), (b"content-length", str(len(packed)).encode())],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": packed, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 503
    assert "CAMSERVE_BODY_BUDGET_BYTES" in json.loads(sent[1]["body"])["error"]["message"]
    assert middleware.held == 0


MULTIPART = b'multipart/form-data; boundary="a b"'
FORM = b'--a b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--a b--\r\n'


def test_a_multipart_body_must_reach_its_closing_boundary() -> None:
    app = ReadingApp()
    for pieces in ([FORM], [FORM[:-5], FORM[-5:]], [bytes([b]) for b in FORM], [FORM, b"epilogue"]):
        answer = run(limited(app), pieces, content_type=MULTIPART)  # type: ignore[arg-type]
        assert answer["status"] == 200, pieces
    assert run(limited(app), [b"--a b--"], content_type=MULTIPART)["status"] == 200  # no parts
    for cut in (FORM[:-9], FORM[:-3], FORM[:10]):
        answer = run(limited(app), [cut[:4], cut[4:]], content_type=MULTIPART)
        error = json.loads(answer["body"])["error"]
        assert answer["status"] == 400 and error["code"] == "bad_request"
        assert "closing boundary" in error["message"]
    # The protocols read any body as JSON, and other bodies have no boundary to reach.
    assert (
        run(limited(app), [FORM[:-9]], "/v2/models/m/infer", content_type=MULTIPART)["status"]
        == 200
    )
    assert run(limited(app), [b"x" * 10], content_type=b"application/json")["status"] == 200


def _budget_call(
    limit: BodyLimitMiddleware, length: int, pieces: list[bytes | None]
) -> tuple[Any, list[Message]]:
    """A request declaring ``length`` bytes whose body arrives as ``pieces`` (``None``: the
    client pauses for good), read whole by an app that answers 200."""
    sent: list[Message] = []
    pending = list(pieces)

    async def receive() -> Message:
        piece = pending.pop(0)
        if piece is None:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": piece, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-length", str(length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/p", "headers": headers}
    return limit(scope, receive, send), sent


def test_a_declared_body_that_does_not_come_holds_none_of_the_budget() -> None:
    """Two connections declaring 150 MB each and trickling 1.5 kB/s held the whole budget
    until the body deadline: every other upload got 503. A body now holds what has arrived."""

    async def main() -> tuple[list[Message], int, int]:
        limit = BodyLimitMiddleware(ReadingApp(), 10**6, budget=100)
        stalled, _ = _budget_call(limit, 90, [b"x" * 5, None])
        hog = asyncio.create_task(stalled)
        await asyncio.sleep(0.01)
        held_by_hog = limit.held
        work, answer = _budget_call(limit, 60, [b"y" * 60])
        await work
        hog.cancel()
        await asyncio.gather(hog, return_exceptions=True)
        return answer, held_by_hog, limit.held

    answer, held_by_hog, held_after = asyncio.run(main())
    assert held_by_hog == 5
    assert answer[0]["status"] == 200
    assert held_after == 0


def test_bodies_that_fit_on_their_headers_are_refused_once_their_bytes_do_not() -> None:
    """Both bodies fit on their headers beside the bytes held then; the first's later bytes do
    not fit beside the second's: 503, and the bytes held never pass the budget."""

    async def main() -> tuple[list[Message], list[Message], int, int]:
        resume, release = asyncio.Event(), asyncio.Event()
        peak = 0

        async def holding_app(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal peak
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
                peak = max(peak, limit.held)
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        limit = BodyLimitMiddleware(holding_app, 10**6, budget=100)
        first: list[Message] = []
        pieces = [b"x" * 10, b"x" * 50]

        async def first_receive() -> Message:
            if len(pieces) == 1:
                await resume.wait()
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}

        async def first_send(message: Message) -> None:
            first.append(message)

        headers = [(b"content-length", b"60")]
        scope = {"type": "http", "method": "POST", "path": "/p", "headers": headers}
        first_task = asyncio.create_task(limit(scope, first_receive, first_send))
        await asyncio.sleep(0.01)  # the first holds 10 bytes
        second_work, second = _budget_call(limit, 60, [b"y" * 60])
        second_task = asyncio.create_task(second_work)  # 10 + 60 fit: it holds 60
        await asyncio.sleep(0.01)
        resume.set()  # the first's 50 more: 120 > 100
        await first_task
        release.set()
        await second_task
        return first, second, peak, limit.held

    first, second, peak, held = asyncio.run(main())
    assert first[0]["status"] == 503
    assert second[0]["status"] == 200
    assert peak <= 100 and held == 0
