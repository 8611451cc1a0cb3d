"""A real ``python -m app`` on a free loopback port, and headless Debian chromium via Playwright.

These tests never skip: without chromium or Playwright they fail and say how to install them
(`make browser-deps`, run by `make test`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
API_KEY = "page-test-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(**extra: str) -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMSERVE_")}
    env.update(
        CAMSERVE_MODEL_STORE=str(ROOT / "model_store"),
        CAMSERVE_DEFAULT_MODEL="shapes",
        CAMSERVE_DEVICE="cpu",
        CAMSERVE_PORT=str(port),
        CAMSERVE_GRPC_PORT="",
        CAMSERVE_LOG_LEVEL="WARNING",
        # The page's tests explain the same examples again and again; the progress and cancel
        # tests need the work to run, not an answer from the cache (tested in tests/pipeline).
        CAMSERVE_CACHE_MB="0",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)  # a test's own store, origins, keys
    process = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=1) as client:  # one client (and TLS context) for every poll
        while True:
            try:
                if client.get(f"{url}/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"server did not start:\n{process.communicate()[0]}")
            time.sleep(0.1)


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    try:
        return process.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]


@pytest.fixture(scope="package")
def servers() -> Iterator[dict[str, str]]:
    """Two services on model_store/shapes, started together: open, and one that wants a key;
    shared by test_page.py and test_tasks.py (the same settings; no test counts on a fresh one)."""
    started = {"open": start(), "keyed": start(CAMSERVE_API_KEY=API_KEY)}
    try:
        for process, url in started.values():
            wait_ready(process, url)
        yield {name: url for name, (_, url) in started.items()}
    finally:
        for process, _ in started.values():
            output = stop(process)
            assert "Traceback" not in output, output


@pytest.fixture(scope="package")
def server(servers: dict[str, str]) -> str:
    return servers["open"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Module-scoped: Playwright's sync API keeps an asyncio loop running on this thread until it
    stops, and the later tests call asyncio.run()."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            f"chromium not found at {CHROMIUM}; install it with `make browser-deps` "
            "(apt-get install -y chromium) or set CHROMIUM to its path."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            headless=True,
            args=["--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()
