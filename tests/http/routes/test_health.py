"""/health is up at once; /ready says 503 until the models are loaded; /docs has examples."""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.models.registry import ModelRegistry
from app.settings import Settings


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["device"] == "cpu"
    assert body["versions"]["torch"] == torch.__version__
    assert body["models_loaded"] is True


def test_ready_when_loaded(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "ready": True,
        "draining": False,
        "models": {"broken": "failed", "resnet": "ready", "tiny": "ready", "vgg": "ready"},
        "job_store": {"backend": "memory", "available": True, "problem": None},
    }


def test_not_ready_while_loading(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    original = ModelRegistry.load_all

    def slow_load(self: ModelRegistry) -> None:
        release.wait(10)
        original(self)

    monkeypatch.setattr(ModelRegistry, "load_all", slow_load)
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
        assert response.status_code == 503
        assert response.json()["models"]["tiny"] == "loading"
        busy = client.post("/predict", files=[("file", ("a.png", b"x", "image/png"))])
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "model_unavailable"
        release.set()
        registry = client.app.state.registry
        assert registry.wait(10)
        assert client.get("/ready").status_code == 200


def test_openapi_documents_routes_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/health", "/ready", "/models", "/models/{name}", "/predict", "/explain"} <= set(
        schema["paths"]
    )
    components = schema["components"]["schemas"]
    for name in ("ExplainResponse", "PredictResponse", "ErrorResponse", "ModelDetail"):
        assert components[name].get("examples"), name
    assert client.get("/docs").status_code == 200


def test_unknown_route_uses_error_shape(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = client.get("/explain")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
