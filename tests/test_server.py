"""The real thing: ``python -m app`` under uvicorn in a subprocess, talked to with httpx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMSERVE_")}
    env.update(
        CAMSERVE_MODEL_STORE=str(store),
        CAMSERVE_DEFAULT_MODEL="tiny",
        CAMSERVE_DEVICE="cpu",
        CAMSERVE_LOG_FORMAT="json",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=environment(
            store,
            CAMSERVE_PORT=str(port),
            CAMSERVE_API_KEY="key",
            CAMSERVE_MAX_UPLOAD_BYTES="65536",
            CAMSERVE_MAX_IMAGES="2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{process.communicate()[0]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            output = process.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
        assert "Traceback" not in output, output
        records = [json.loads(line) for line in output.splitlines() if line.strip()]  # json logs
        assert sum("camserve 0.1.0 on device cpu" in r["message"] for r in records) == 1


def test_health_and_explain_over_http(server: str) -> None:
    assert httpx.get(f"{server}/health").json()["device"] == "cpu"
    headers = {"X-API-Key": "key"}
    assert httpx.get(f"{server}/models").status_code == 401
    files = [("file", ("a.png", image_bytes((40, 32)), "image/png"))]
    response = httpx.post(
        f"{server}/explain",
        files=files,
        data={"method": "scorecam", "output": ["overlay", "raw"], "batch_size": "4"},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["method"] == "ScoreCAM"
    png = httpx.post(
        f"{server}/explain",
        files=files,
        headers={**headers, "Accept": "image/png"},
        timeout=30,
    )
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")


def test_oversized_upload_is_refused_over_http(server: str) -> None:
    body = b"x" * (1024 * 1024)  # over 2 images x 64 KiB + the form allowance
    response = httpx.post(
        f"{server}/explain",
        content=body,
        headers={"X-API-Key": "key", "Content-Type": "multipart/form-data; boundary=x"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_bad_setting_stops_startup(store: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=environment(store, CAMSERVE_PORT="eighty"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CAMSERVE_PORT" in result.stderr and "valid integer" in result.stderr


def test_missing_cuda_device_stops_startup(store: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=environment(store, CAMSERVE_DEVICE="cuda:7", CAMSERVE_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "CAMSERVE_DEVICE=cuda:7" in result.stdout + result.stderr
