"""A real ``python -m app`` for the client and the command line, with an API key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import image_bytes
from tests.http.test_server import start_server, stop_server

API_KEY = "key"


@pytest.fixture(scope="package")
def server(store: Path) -> Iterator[str]:
    process, url = start_server(store, CAMSERVE_API_KEY=API_KEY, CAMSERVE_LOG_LEVEL="WARNING")
    try:
        yield url
    finally:
        stop_server(process)


@pytest.fixture(scope="package")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seeded PNGs and a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "a.png").write_bytes(image_bytes((40, 32), seed=1))
    (folder / "b.png").write_bytes(image_bytes((36, 36), seed=2))
    (folder / "notes.txt").write_text("not an image")
    return folder
