"""The repository API (OIP extension and native): the admin key, the control mode, the shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import assert_error, files, image_bytes
from tests.models.store_helpers import break_weights, put_tiny

ADMIN = {"X-Admin-Key": "admin"}


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    put_tiny(tmp_path, "tiny", seed=0)
    return tmp_path


@pytest.fixture
def explicit(make_client: Callable[..., TestClient], small_store: Path) -> TestClient:
    return make_client(model_store=small_store, model_control="explicit", admin_key="admin")


@pytest.mark.parametrize(
    "path", ["/models/tiny/load", "/models/tiny/unload", "/v2/repository/index"]
)
def test_off_without_an_admin_key(
    make_client: Callable[..., TestClient], small_store: Path, path: str
) -> None:
    client = make_client(model_store=small_store, model_control="explicit")
    response = client.post(path, headers=ADMIN)
    assert response.status_code == 403
    message = str(response.json()["error"])
    assert "Set CAMSERVE_ADMIN_KEY" in message and "X-Admin-Key" in message


def test_wrong_admin_key_is_401_in_each_shape(explicit: TestClient) -> None:
    assert_error(
        explicit.post("/models/tiny/load", headers={"X-Admin-Key": "x"}), 401, "unauthorized"
    )
    response = explicit.post("/v2/repository/models/tiny/load")
    assert response.status_code == 401
    assert "X-Admin-Key" in response.json()["error"]


def test_the_api_key_is_not_the_admin_key(
    make_client: Callable[..., TestClient], small_store: Path
) -> None:
    client = make_client(
        model_store=small_store, model_control="explicit", admin_key="admin", api_key="user"
    )
    assert client.post("/models/tiny/load", headers={"X-Admin-Key": "user"}).status_code == 401
    assert client.post("/models/tiny/load", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_loads_need_explicit_mode(
    make_client: Callable[..., TestClient], small_store: Path, mode: str
) -> None:
    client = make_client(model_store=small_store, model_control=mode, admin_key="admin")
    message = assert_error(
        client.post("/models/tiny/load", headers=ADMIN), 409, "model_control_mode"
    )
    assert "CAMSERVE_MODEL_CONTROL=explicit" in message
    assert client.post("/v2/repository/index", headers=ADMIN).status_code == 200


def test_load_index_and_unload_in_oip_shapes(explicit: TestClient, small_store: Path) -> None:
    put_tiny(small_store, "added", seed=1)
    index = explicit.post("/v2/repository/index", headers=ADMIN).json()
    assert index == [
        {"name": "added", "version": None, "state": "UNAVAILABLE", "reason": "not loaded"},
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
    ]
    assert explicit.post("/v2/repository/models/added/load", headers=ADMIN).json() == {}
    predict = explicit.post("/predict", files=files(image_bytes()), data={"model": "added"})
    assert predict.status_code == 200 and predict.json()["version"] == 1

    assert explicit.post("/v2/repository/models/added/unload", headers=ADMIN).json() == {}
    ready_only = explicit.post("/v2/repository/index", headers=ADMIN, json={"ready": True})
    assert [row["name"] for row in ready_only.json()] == ["tiny"]
    refused = explicit.post("/predict", files=files(image_bytes()), data={"model": "added"})
    assert "POST /models/added/load" in assert_error(refused, 503, "model_unavailable")

    missing = explicit.post("/v2/repository/models/nope/load", headers=ADMIN)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_native_load_answers_the_summary(explicit: TestClient, small_store: Path) -> None:
    put_tiny(small_store, "added", seed=1)
    body = explicit.post("/models/added/load", headers=ADMIN).json()
    assert body["status"] == "ready" and body["version"] == 1
    assert body["versions"] == [
        {"version": 1, "status": "ready", "error": None, "reload_error": None}
    ]
    assert explicit.post("/models/added/unload", headers=ADMIN).json()["status"] == "unloaded"


def test_a_failed_reload_is_422_and_shown_by_the_model(
    explicit: TestClient, small_store: Path
) -> None:
    break_weights(small_store / "tiny")
    message = assert_error(
        explicit.post("/models/tiny/load", headers=ADMIN), 422, "model_load_failed"
    )
    assert "cannot read weights weights.pt" in message
    detail = explicit.get("/models/tiny").json()
    assert detail["status"] == "ready"
    assert "cannot read weights weights.pt" in detail["reload_error"]
    assert explicit.post("/predict", files=files(image_bytes())).status_code == 200


def test_a_load_that_races_another_is_409(explicit: TestClient) -> None:
    registry = explicit.app.state.registry  # type: ignore[attr-defined]
    with registry.claim("tiny"):  # a load or unload of tiny is running
        message = assert_error(explicit.post("/models/tiny/load", headers=ADMIN), 409, "model_busy")
        assert "being loaded or unloaded already" in message
        unload = explicit.post("/v2/repository/models/tiny/unload", headers=ADMIN)
        assert unload.status_code == 409
        assert unload.headers["retry-after"] == "1"
    assert explicit.post("/models/tiny/load", headers=ADMIN).status_code == 200


def test_the_index_lists_the_known_models_when_the_store_cannot_be_listed(
    explicit: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(store: Path) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(store))

    monkeypatch.setattr("app.protocols.repository.model_folders", unreadable)
    index = explicit.post("/v2/repository/index", headers=ADMIN)
    assert index.status_code == 200 and [row["name"] for row in index.json()] == ["tiny"]
