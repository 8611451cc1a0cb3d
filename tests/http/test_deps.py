"""Request-scoped dependencies: the one API-key comparison and who a client is."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.requests import Request

from app.http import deps
from app.http.middleware import gate
from app.settings import ConfigurationError, Settings, load_settings
from tests.conftest import assert_error, files, image_bytes


@pytest.mark.parametrize("key", ["sécret", "ключ", "k"])
def test_a_key_works_in_any_script(make_client: Callable[..., TestClient], key: str) -> None:
    client = make_client(api_key=key)
    sent = {"X-API-Key": key.encode("utf-8")}
    assert client.get("/models", headers=sent).status_code == 200  # gate and dependency
    response = client.post("/predict", files=files(image_bytes()), headers=sent)
    assert response.status_code == 200, response.text
    wrong = {"X-API-Key": (key + "x").encode("utf-8")}
    assert_error(client.get("/models", headers=wrong), 401, "unauthorized")
    # The same characters in another encoding are another key.
    if not key.isascii():
        latin = {"X-API-Key": key.encode("utf-16-le")}
        assert_error(client.get("/models", headers=latin), 401, "unauthorized")


def test_the_gate_and_the_routes_share_one_comparison() -> None:
    assert gate.api_key_matches is deps.api_key_matches
    assert deps.api_key_matches("sécret".encode(), "sécret")
    assert not deps.api_key_matches(None, "sécret")
    assert not deps.api_key_matches("sécret".encode("latin-1"), "sécret")


def _request(settings: Settings, key: bytes | None, host: str = "10.0.0.1") -> Request:
    class State:
        pass

    app = type("App", (), {"state": State()})()
    app.state.settings = settings
    app.state.api_keys = deps.ApiKeys.from_settings(settings)
    headers = [(b"x-api-key", key)] if key is not None else []
    return Request({"type": "http", "headers": headers, "client": (host, 1), "app": app})


def test_a_client_is_its_keys_name_when_keys_are_required_else_its_address(
    settings: Settings,
) -> None:
    keyed = settings.model_copy(update={"api_key": SecretStr("k")})
    assert deps.client_identity(_request(keyed, b"k")) == "key:default"
    assert deps.client_identity(_request(keyed, b"k")) != deps.client_identity(
        _request(keyed, b"j")
    )
    # Without a required key, a made-up one does not make a new client.
    assert deps.client_identity(_request(settings, b"made-up")) == "address:10.0.0.1"
    assert deps.client_identity(_request(settings, None, "10.0.0.2")) == "address:10.0.0.2"


def test_named_keys_come_from_the_environment_and_a_file(settings: Settings, tmp_path) -> None:
    listed = tmp_path / "keys"
    listed.write_text("# the team's keys\nalice: a-key\n\nbob:b-key\n")
    named = settings.model_copy(
        update={
            "api_key": SecretStr("old"),
            "api_keys": SecretStr("carol:c-key"),
            "api_keys_file": listed,
        }
    )
    keys = deps.ApiKeys.from_settings(named)
    assert keys.required
    for sent, name in [
        (b"a-key", "alice"),
        (b"b-key", "bob"),
        (b"c-key", "carol"),
        (b"old", "default"),
        (b"nope", None),
        (None, None),
    ]:
        assert keys.name_of(sent) == name
        identity = deps.client_identity(_request(named, sent, "10.0.0.9"))
        assert identity == f"key:{name or '-'}"  # the name, never the key
    assert not deps.ApiKeys.from_settings(settings).required


@pytest.mark.parametrize(
    ("variables", "names"),
    [
        ({"CAMSERVE_API_KEYS": "a:1,a:2"}, "given twice"),
        ({"CAMSERVE_API_KEYS": "a:secret-value,b:secret-value"}, "repeats another key"),
        ({"CAMSERVE_API_KEYS": "no-colon"}, "is not name:key"),
        ({"CAMSERVE_API_KEYS": "bad name:1"}, "key name"),
        ({"CAMSERVE_API_KEYS": "a:"}, "is empty"),
        ({"CAMSERVE_API_KEYS_FILE": "/no/such/file"}, "cannot be read"),
    ],
)
def test_bad_named_keys_stop_startup_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], names: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert names in str(refused.value)
    assert next(iter(variables)) in str(refused.value)
    assert "secret-value" not in str(refused.value)  # keys are never echoed


def test_each_named_key_opens_the_routes_and_counts_under_its_name(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_keys="alice:a-key,bob:b-key")
    for key in ("a-key", "b-key"):
        assert client.get("/models", headers={"X-API-Key": key}).status_code == 200
    assert_error(client.get("/models", headers={"X-API-Key": "c-key"}), 401, "unauthorized")
    assert_error(client.get("/models"), 401, "unauthorized")
    metrics = client.get("/metrics").text
    assert 'camserve_client_requests_total{client="alice",status="200"} 1.0' in metrics
    assert 'camserve_client_requests_total{client="bob",status="200"} 1.0' in metrics
    assert 'camserve_client_requests_total{client="-",status="401"} 2.0' in metrics
    assert "a-key" not in metrics and "b-key" not in metrics


def _sync_dependencies(dependant) -> list[str]:  # type: ignore[no-untyped-def]
    """The plain functions among a route's dependencies, at any depth (FastAPI runs each on a
    worker thread)."""
    from fastapi.dependencies.utils import _is_coroutine_callable

    found = []
    for sub in dependant.dependencies:
        if sub.call is not None and not _is_coroutine_callable(sub.call):
            found.append(getattr(sub.call, "__qualname__", repr(sub.call)))
        found += _sync_dependencies(sub)
    return found


def test_the_work_routes_take_no_thread_hop_for_their_dependencies(app) -> None:  # type: ignore[no-untyped-def]
    """/explain, /predict, /jobs and the protocols' inference routes resolve their dependencies
    on the event loop: each hop to a worker thread waits twice for the GIL behind a pass or a
    drawing."""
    from fastapi.routing import APIRoute

    from app.http.errors import _flat

    routes = [
        route
        for route in _flat(app.router.routes)
        if isinstance(route, APIRoute)
        and ("POST" in route.methods or route.path == "/jobs/{job_id}/events")
    ]
    assert {"/explain", "/predict", "/jobs", "/jobs/{job_id}/events"} <= {r.path for r in routes}
    hops = {r.path: _sync_dependencies(r.dependant) for r in routes}
    assert {path: calls for path, calls in hops.items() if calls} == {}
