"""The gate: the API key and the drain, decided on the headers, for every route that runs model
work; its coverage is read from the app's routes, so no route can be left out of it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from app.http.app import create_app
from app.http.middleware.gate import GateMiddleware
from app.lifecycle import Lifecycle
from app.settings import Settings
from tests.conftest import files, image_bytes
from tests.http.protocols.test_oip import assert_protocol_error, infer_body

KEY = "s3cret"


class Inner:
    """The app behind the gate: records whether a request got through, and the drain count."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.calls: list[str] = []
        self.in_flight_seen: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append(scope["path"])
        self.in_flight_seen.append(self.lifecycle.in_flight)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def gate_of(app: FastAPI) -> tuple[GateMiddleware, Inner, Lifecycle]:
    """The gate exactly as ``create_app`` configured it, in front of a recording app."""
    [middleware] = [m for m in app.user_middleware if m.cls is GateMiddleware]
    lifecycle: Lifecycle = middleware.kwargs["lifecycle"]
    inner = Inner(lifecycle)
    return GateMiddleware(inner, *middleware.args, **middleware.kwargs), inner, lifecycle


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Scope:
    """An ASGI HTTP scope of ``method path`` with these headers, as the server hands it over."""
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
    }


def call(gate: GateMiddleware, method: str, path: str, key: str | None = None) -> dict[str, Any]:
    """One request through ``gate``: its status, headers and (JSON) body."""
    headers = [(b"host", b"test")] + ([(b"x-api-key", key.encode())] if key else [])
    scope = http_scope(method, path, headers)
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the gate must decide before reading the body")

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {
        "status": sent[0]["status"],
        "headers": dict(sent[0]["headers"]),
        "body": json.loads(body) if body else None,
    }


def concrete(path: str) -> str:
    """A path template with every parameter filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.fixture
def keyed_app(store: Path) -> FastAPI:
    return create_app(Settings(model_store=store, device="cpu", api_key=KEY))


def model_work(app: FastAPI) -> list[tuple[str, str, bool]]:
    """(method, path, admin) of every operation the OpenAPI schema (FastAPI's own walk over the
    routes) lists as a POST or as asking for a key; ``admin``: it asks for the repository API's
    admin key rather than the API key."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            schemes = {name for needed in operation.get("security", []) for name in needed}
            if method == "post" or schemes:
                found.append((method.upper(), path, "AdminKey" in schemes))
    return found


def test_every_post_and_every_keyed_route_is_refused_without_the_key(
    keyed_app: FastAPI,
) -> None:
    gate, inner, _ = gate_of(keyed_app)
    operations = model_work(keyed_app)
    posts = {path for method, path, _ in operations if method == "POST"}
    # A floor for the walk itself (an empty walk would prove nothing).
    assert {"/predict", "/explain", "/jobs", "/v2/models/{name}/infer"} <= posts
    assert {"/v1/models/{name}:predict", "/v1/models/{name}:explain"} <= posts
    admin = [(method, path) for method, path, admin in operations if admin]
    assert ("POST", "/models/{name}/load") in admin  # the repository API has a key of its own
    for method, path, _ in [op for op in operations if not op[2]]:
        answer = call(gate, method, concrete(path))
        assert answer["status"] == 401, (method, path)
        assert answer["headers"][b"www-authenticate"] == b"ApiKey"
    assert inner.calls == []
    for method, path in admin:  # passed on: the route checks the admin key
        call(gate, method, concrete(path))
    assert len(inner.calls) == len(admin)


def test_every_post_is_refused_during_the_drain(keyed_app: FastAPI) -> None:
    gate, inner, lifecycle = gate_of(keyed_app)
    lifecycle.begin_drain()
    posts = [path for method, path, _ in model_work(keyed_app) if method == "POST"]
    for path in posts:
        answer = call(gate, "POST", concrete(path), key=KEY)
        assert answer["status"] == 503, path
        assert answer["headers"][b"retry-after"] == b"1"
    assert inner.calls == []
    assert call(gate, "GET", "/models", key=KEY)["status"] == 204  # reads still answer


def test_refusals_take_the_shape_of_the_route(keyed_app: FastAPI) -> None:
    gate, _, _ = gate_of(keyed_app)
    native = call(gate, "POST", "/explain")["body"]
    assert native["error"]["code"] == "unauthorized"
    protocol = call(gate, "POST", "/v2/models/tiny/infer")["body"]
    assert set(protocol) == {"error"} and "X-API-Key" in protocol["error"]


def test_open_routes_and_the_right_key_pass(keyed_app: FastAPI) -> None:
    gate, inner, _ = gate_of(keyed_app)
    assert call(gate, "GET", "/health")["status"] == 204
    assert call(gate, "GET", "/")["status"] == 204  # the page; its API calls carry the key
    assert call(gate, "POST", "/explain", key=KEY)["status"] == 204
    assert inner.calls == ["/health", "/", "/explain"]


def test_a_route_added_later_is_covered_too(keyed_app: FastAPI) -> None:
    gate, inner, _ = gate_of(keyed_app)

    @keyed_app.post("/late")
    def late() -> None:  # no require_api_key: being a POST is enough
        """A route added after the middleware was configured."""

    assert call(gate, "POST", "/late")["status"] == 401
    assert inner.calls == []


def test_posts_count_as_in_flight_while_they_run(store: Path) -> None:
    gate, inner, lifecycle = gate_of(create_app(Settings(model_store=store, device="cpu")))
    call(gate, "POST", "/explain")
    call(gate, "GET", "/models")
    assert inner.in_flight_seen == [1, 0]
    assert lifecycle.in_flight == 0


def test_the_drain_refuses_new_work_in_the_protocol_shape(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    client.app.state.lifecycle.begin_drain()  # type: ignore[attr-defined]
    response = client.post("/v2/models/tiny/infer", json=infer_body(image_bytes()))
    assert "shutting down" in assert_protocol_error(response, 503)
    assert response.headers["retry-after"] == "1"
    assert_protocol_error(
        client.post("/v1/models/tiny:predict", json={"instances": [{"image": {"b64": "x"}}]}), 503
    )
    assert client.get("/v2/health/ready").status_code == 503  # probes see the drain too


def call_from(
    gate: GateMiddleware, method: str, path: str, origin: str, host: str = "camserve.test"
) -> dict[str, Any]:
    """``call`` with an Origin header, as a browser page sends it."""
    sent: list[Message] = []
    scope = http_scope(method, path, [(b"host", host.encode()), (b"origin", origin.encode())])

    async def receive() -> Message:
        raise AssertionError("the gate must decide before reading the body")

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": sent[0]["status"], "body": json.loads(body) if body else None}


def test_a_page_of_another_origin_gets_no_work_done(store: Path) -> None:
    app = create_app(Settings(model_store=store, device="cpu", cors_origins="http://app.test"))
    gate, inner, _ = gate_of(app)
    for method, path in [("POST", "/explain"), ("POST", "/jobs"), ("DELETE", "/jobs/x")]:
        answer = call_from(gate, method, path, "http://evil.test")
        assert answer["status"] == 403, (method, path)
        error = answer["body"]["error"]
        assert error["code"] == "origin_not_allowed" and "CAMSERVE_CORS_ORIGINS" in error["message"]
    assert inner.calls == []  # refused before any work
    assert call_from(gate, "POST", "/explain", "http://app.test")["status"] == 204  # allowed
    assert call_from(gate, "POST", "/explain", "https://camserve.test")["status"] == 204  # own
    # The page's port: behind nginx, Host is $host, without it.
    assert call_from(gate, "POST", "/explain", "http://camserve.test:8080")["status"] == 204
    assert call_from(gate, "POST", "/explain", "http://camserve.test.evil")["status"] == 403
    assert call_from(gate, "GET", "/jobs/x", "http://evil.test")["status"] == 204  # reads pass
    assert call_from(gate, "POST", "/explain", "null")["status"] == 403


def test_a_page_on_another_port_of_the_services_host_gets_no_work_done(store: Path) -> None:
    """Found by a hostile review: any page of the service's host name had work done, whatever
    its port (another service on 127.0.0.1, a dev server)."""
    gate, inner, _ = gate_of(create_app(Settings(model_store=store, device="cpu")))
    for host, origin, status in [
        ("127.0.0.1:8000", "http://127.0.0.1:8000", 204),  # the page the service serves
        ("127.0.0.1:8000", "http://127.0.0.1:9999", 403),
        ("127.0.0.1:8000", "http://127.0.0.1", 403),
        ("[::1]:8000", "http://[::1]:8000", 204),
        ("[::1]:8000", "http://[::1]:8001", 403),
        ("camserve.test:443", "https://camserve.test", 204),  # a default port, left out
        ("camserve.test:8443", "https://camserve.test:8443", 204),
        (
            "camserve.test",
            "https://camserve.test:8443",
            204,
        ),  # Host without its port: nginx's $host
        ("camserve.test:8000", "http://camserve.test:80", 403),
    ]:
        assert call_from(gate, "POST", "/explain", origin, host)["status"] == status, (host, origin)
    assert len(inner.calls) == 5  # only the 204s reached the app


def test_cors_lets_an_allowed_page_cancel_and_refuses_a_foreign_upload(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(cors_origins=["http://app.test"])
    preflight = client.options(
        "/jobs/some-id",
        headers={"Origin": "http://app.test", "Access-Control-Request-Method": "DELETE"},
    )
    assert preflight.status_code == 200
    assert "DELETE" in preflight.headers["access-control-allow-methods"]
    upload = {"files": [("file", ("a.png", image_bytes(), "image/png"))]}
    foreign = client.post("/explain", headers={"Origin": "http://evil.test"}, **upload)
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "origin_not_allowed"
    for headers in ({"Origin": "http://app.test"}, {"Origin": "http://testserver"}, {}):
        assert client.post("/explain", headers=headers, **upload).status_code == 200, headers


class _Uploading:
    """An app that reads the body and, as FastAPI does, answers 400 when the read fails."""

    def __init__(self) -> None:
        self.read = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while (message := await receive()).get("more_body", False):
                self.read += len(message.get("body", b""))
        except Exception:  # noqa: BLE001 - FastAPI: "There was an error parsing the body"
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"parse error"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


def test_the_cut_answers_a_body_still_arriving_with_json_503(store: Path) -> None:
    """A body trickling in at the allowed pace past the drain's grace kept its request until
    uvicorn cancelled it at shutdown, with a plain-text 500. The cut now answers it 503."""
    app = create_app(Settings(model_store=store, device="cpu"))
    gate, _, lifecycle = gate_of(app)
    uploading = _Uploading()
    gate.app = uploading
    scope = http_scope("POST", "/explain", [(b"host", b"test"), (b"content-length", b"100000")])
    sent: list[Message] = []
    pieces = [b"x" * 10]

    async def receive() -> Message:
        if not pieces:
            await asyncio.Event().wait()  # the rest of the body never comes
        return {"type": "http.request", "body": pieces.pop(), "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> None:
        request = asyncio.create_task(gate(scope, receive, send))
        for _ in range(10):
            await asyncio.sleep(0)
        assert lifecycle.in_flight == 1 and sent == []
        lifecycle.begin_drain()
        lifecycle.cut.set()
        await asyncio.wait_for(request, 30)  # before: it waited for the body for ever

    asyncio.run(main())
    assert uploading.read == 10
    assert sent[0]["status"] == 503
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] == "shutting_down"
    assert lifecycle.in_flight == 0


def test_a_body_read_whole_is_not_cut_by_the_gate(store: Path) -> None:
    gate, _, lifecycle = gate_of(create_app(Settings(model_store=store, device="cpu")))
    uploading = _Uploading()
    gate.app = uploading
    scope = http_scope("POST", "/explain", [(b"host", b"test")])
    pieces = [{"type": "http.request", "body": b"x", "more_body": True}] * 2 + [
        {"type": "http.request", "body": b"", "more_body": False}
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return pieces.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    assert sent[0]["status"] == 200 and uploading.read == 2


def test_a_refusal_is_counted_under_its_route(make_client: Callable[..., TestClient]) -> None:
    # It was counted under 'unmatched': the gate answers before the router sets the route.
    client = make_client(api_key=KEY)
    assert client.post("/explain", files=files(image_bytes())).status_code == 401
    assert client.post("/v2/models/tiny/infer", json={}).status_code == 401
    text = client.get("/metrics").text
    for route in ("/explain", "/v2/models/{name}/infer"):
        pattern = rf'^camserve_requests_total\{{[^}}]*route="{re.escape(route)}"[^}}]*status="401"'
        assert re.search(pattern, text, re.MULTILINE), route
