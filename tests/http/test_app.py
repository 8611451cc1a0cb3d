"""The application factory: its steps (routes, OpenAPI, middleware) and its startup."""

from __future__ import annotations

import logging

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
