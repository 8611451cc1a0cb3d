"""What the protocol routes share: bodies parsed off the event loop, checked before FastAPI."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.http.protocols import base


def test_bodies_are_parsed_and_checked_on_a_worker_thread(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    parse = base._parse_body

    def spy(checker: Any, body: bytes) -> Any:
        threads.append(threading.current_thread())
        return parse(checker, body)

    monkeypatch.setattr(base, "_parse_body", spy)
    tensor = {"name": "image", "shape": [-1] * 100_000, "datatype": "BYTES", "data": ["a"]}
    response = client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
    assert response.status_code == 400, response.text
    response = client.post("/v1/models/tiny:predict", json={"instances": [{"image": {"b64": 1}}]})
    assert response.status_code == 400, response.text
    assert len(threads) == 2
    assert all(thread is not threading.main_thread() for thread in threads)
    # The event loop of TestClient runs in its own thread: the parse ran on neither.
    assert all(thread.name.startswith("AnyIO worker thread") for thread in threads), threads


def test_invalid_json_names_the_problem(client: TestClient) -> None:
    response = client.post(
        "/v2/models/tiny/infer",
        content=b'{"inputs": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]
