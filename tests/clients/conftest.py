"""One real camserve (``python -m app`` under uvicorn on a free loopback port) for the clients'
tests, with the repository API on and limits small enough to reach."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import image_bytes
from tests.http.test_server import start_server, stop_server

ADMIN_KEY = "admin-secret"
MAX_UPLOAD_BYTES = 65_536
MAX_IMAGES = 4


@pytest.fixture(scope="package")
def server(store: Path) -> Iterator[str]:
    """The server's base URL (``http://127.0.0.1:PORT``)."""
    process, url = start_server(
        store,
        CAMSERVE_ADMIN_KEY=ADMIN_KEY,
        CAMSERVE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        CAMSERVE_MAX_IMAGES=str(MAX_IMAGES),
        CAMSERVE_MODEL_CONTROL="explicit",
    )
    try:
        yield url
    finally:
        stop_server(process)


@pytest.fixture(scope="package")
def host(server: str) -> str:
    """``127.0.0.1:PORT``, as tritonclient takes it."""
    return server.removeprefix("http://")


def predict_logits(server: str, images: list[bytes], model: str) -> list[list[float]]:
    """Each image's logits from the native /predict (every class), for comparison."""
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    answer = httpx.post(
        f"{server}/predict", files=files, data={"model": model, "top_k": "1000"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    rows = []
    for result in answer.json()["results"]:
        row = [0.0] * len(result["predictions"])
        for prediction in result["predictions"]:
            row[prediction["class_idx"]] = prediction["logit"]
        rows.append(row)
    return rows


def explain_raw(server: str, images: list[bytes], model: str, method: str) -> list[Any]:
    """/explain's raw map of each image, sent together (a batch's maps can differ from single
    images' in the last bits of float32)."""
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    answer = httpx.post(
        f"{server}/explain",
        files=files,
        data={"model": model, "method": method, "output": "raw"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return [r["explanations"][0]["maps"][-1]["raw"]["values"] for r in answer.json()["results"]]


IMAGES = [image_bytes(seed=11), image_bytes((48, 36), seed=12)]
IMAGES_B64 = [base64.b64encode(image).decode() for image in IMAGES]
