"""The application factory: its steps (routes, OpenAPI, middleware) and its startup."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.http.middleware.gate import GateMiddleware
from app.settings import Settings
from tests.conftest import wait_ready


def test_middleware_order_and_the_gate_on_the_live_routes(settings: Settings) -> None:
    app = create_app(settings)
    names = [m.cls.__name__ for m in app.user_middleware]  # outermost first
    assert names == [
        "QuietRefusal",  # the lifespan's only: a refused start's traceback
        "SecurityHeaders",  # on every answer, a 431 included
        "HeaderCapMiddleware",
        "AccessMiddleware",
        "HeadMiddleware",  # inside the access log (which names HEAD), outside everything else
        "AllowedHostsMiddleware",  # before CORS and the gate, which trust the page's host name
        "GateMiddleware",
        "BodyLimitMiddleware",
        "ProtocolCompression",
    ]
    [gate] = [m for m in app.user_middleware if m.cls is GateMiddleware]
    assert gate.kwargs["routes"] is app.router.routes


def test_startup_warns_about_an_old_variable_name(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CAMSERVE_MAX_CONCURRENT_JOBS", "1")
    with caplog.at_level(logging.WARNING, logger="app.settings"):
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
    assert any(
        r.levelno == logging.WARNING and "CAMSERVE_MAX_CONCURRENT_JOBS is deprecated" in r.message
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "path, method, headers",
    [
        ("/explain", "POST", "x-api-key,x-request-id"),
        ("/explain", "POST", "content-encoding"),  # a body the page gzipped
        ("/jobs/some-id/events", "GET", "x-api-key,last-event-id"),  # a stream taken up again
        ("/v2/models/tiny/infer", "POST", "content-type,inference-header-content-length"),
        ("/v1/models/tiny:predict", "POST", "content-type,x-api-key"),
    ],
)
def test_an_allowed_page_may_send_what_each_route_reads(
    make_client: Callable[..., TestClient], path: str, method: str, headers: str
) -> None:
    """Found by a hostile review: the preflights of a page of an allowed origin refused
    Inference-Header-Content-Length (OIP's binary bodies), Last-Event-ID (a job's stream taken
    up where it broke, as the page does) and Content-Encoding (compressed bodies)."""
    client = make_client(cors_origins=["http://app.test"])
    preflight = client.options(
        path,
        headers={
            "Origin": "http://app.test",
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )
    assert preflight.status_code == 200, preflight.text
    allowed = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert set(headers.split(",")) <= allowed


def test_an_allowed_page_may_read_the_headers_of_the_answers(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(cors_origins=["http://app.test"])
    answer = client.get("/health", headers={"Origin": "http://app.test"})
    assert answer.headers["access-control-allow-origin"] == "http://app.test"
    assert "access-control-allow-credentials" not in answer.headers  # keys go in a header
    exposed = {
        h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")
    }
    # A job's Location, OIP's binary framing, the cache's word, the picture's class and label.
    assert {
        "location",
        "inference-header-content-length",
        "x-camserve-cache",
        "x-camserve-method",
        "x-camserve-class",
        "x-camserve-label",
        "retry-after",
        "x-request-id",
    } <= exposed
