"""Shared fixtures: a seeded model store in a tmp folder, apps and clients built on it."""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from app.http.app import create_app
from app.settings import Settings
from tests.fixtures_models import FIXTURE_MODULE, build_tiny, build_vgg_like, write_model
from tests.redis_server import RedisServer

for _name in [k for k in os.environ if k.startswith("CAMSERVE_")]:
    del os.environ[_name]  # a developer's shell must not change what the tests see
# The test stores name factories of tests/fixtures_models.py; every Settings of the tests trusts
# that module (a test of the refusal gives its own CAMSERVE_TRUSTED_MODULES).
os.environ["CAMSERVE_TRUSTED_MODULES"] = FIXTURE_MODULE
# The tests send the same seeded images again and again and check the work each one causes (its
# passes, timings, progress, metrics): the explanation cache is off unless a test turns it on
# (cache_mb=..., as the cache's own tests do).
os.environ["CAMSERVE_CACHE_MB"] = "0"
# Starlette's TestClient names the host "testserver", a name that a service on a loopback address
# does not answer to unless it is allowed (CAMSERVE_ALLOWED_HOSTS: DNS rebinding).
os.environ["CAMSERVE_ALLOWED_HOSTS"] = "testserver"


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (all methods), resnet (torchvision resnet18, 5 classes), vgg (no CAM), broken."""
    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    write_model(
        root,
        "tiny",
        build_tiny(),
        architecture="tests.fixtures_models:build_tiny",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
    )
    write_model(
        root,
        "resnet",
        torchvision.models.resnet18(num_classes=5),
        architecture="resnet18",
        kwargs="kwargs = { num_classes = 5 }",
        num_classes=5,
        input_size=64,
        target_layers=["layer3"],
    )
    write_model(
        root,
        "vgg",
        build_vgg_like(),
        architecture="tests.fixtures_models:build_vgg_like",
        num_classes=3,
        input_size=32,
        target_layers=["features.0"],
    )
    broken = root / "broken"
    broken.mkdir()
    (broken / "model.toml").write_text('[model]\narchitecture = "resnet18"\n')
    return root


@pytest.fixture(scope="session")
def settings(store: Path) -> Settings:
    return Settings(model_store=store, default_model="tiny", device="cpu")


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    """Poll /ready until every model has loaded (or failed)."""
    deadline = time.monotonic() + timeout
    registry = getattr(getattr(client.app, "state", None), "registry", None)
    if registry is not None:  # first the end of the first scan, without polling beside the loads
        registry.wait(timeout)
    while client.get("/ready").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("models did not load in time")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    """One started service shared by the tests that do not change settings."""
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """Start a separate service with some settings changed; closed after the test."""
    opened: list[TestClient] = []

    def factory(base_url: str = "http://testserver", **changes: object) -> TestClient:
        """``base_url``: where the client says it calls (its Host header)."""
        app = create_app(Settings(**{**settings.model_dump(), **changes}))
        test_client = TestClient(app, base_url=base_url)
        test_client.__enter__()
        opened.append(test_client)
        wait_ready(test_client)
        return test_client

    yield factory
    for test_client in opened:
        test_client.__exit__(None, None, None)


def image_bytes(
    size: tuple[int, int] = (40, 32), mode: str = "RGB", fmt: str = "PNG", seed: int = 0, **save
) -> bytes:
    """A seeded random image in ``mode``, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    image = rgb if mode == "RGB" else rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def files(*images: bytes, name: str = "img.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``file`` parts for TestClient."""
    return [("file", (f"{i}-{name}", data, "image/png")) for i, data in enumerate(images)]


def assert_error(response, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    """Check the status and the JSON error shape; return the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    return body["error"]["message"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (``apt-get install redis-server``; never skipped)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _on_the_event_loop() -> bool:
    """Whether the caller runs on the thread of a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def calls_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, target: str, instead: Callable[..., Any] | None = None
) -> list[bool]:
    """Record, for each call of ``target`` (``module.name``), whether it ran on the event loop's
    thread; the call goes on to the original, or to ``instead``. The list fills as calls come."""
    module, name = target.rsplit(".", 1)
    original = instead or getattr(importlib.import_module(module), name)
    seen: list[bool] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        seen.append(_on_the_event_loop())
        return original(*args, **kwargs)

    monkeypatch.setattr(target, recorded)
    return seen
