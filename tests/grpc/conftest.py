"""A real ``python -m app`` serving HTTP and gRPC on free loopback ports, with an API key and
small upload limits, and tritonclient.grpc pointed at it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient

from tests.http.test_server import free_port, start_server, stop_server

API_KEY = "key"
KEYED = {"x-api-key": API_KEY}
MAX_UPLOAD_BYTES = 65536
MAX_IMAGES = 2


@dataclass(frozen=True)
class Served:
    url: str
    """The HTTP base URL."""
    target: str
    """The gRPC target, ``127.0.0.1:port``."""


def wait_for_grpc(target: str, process: subprocess.Popen[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the gRPC port never opened") from None


@pytest.fixture(scope="package")
def served(store: Path) -> Iterator[Served]:
    port = free_port()
    process, url = start_server(
        store,
        CAMSERVE_GRPC_PORT=str(port),
        CAMSERVE_API_KEY=API_KEY,
        CAMSERVE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        CAMSERVE_MAX_IMAGES=str(MAX_IMAGES),
        CAMSERVE_LOG_LEVEL="WARNING",
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_grpc(target, process)
        yield Served(url, target)
    finally:
        stop_server(process)


@pytest.fixture(scope="package")
def triton(served: Served) -> Iterator[grpcclient.InferenceServerClient]:
    """tritonclient.grpc with its defaults."""
    client = grpcclient.InferenceServerClient(served.target)
    yield client
    client.close()


ADMIN_KEY = "admin-secret"
ADMIN = {"x-admin-key": ADMIN_KEY}


@pytest.fixture(scope="package")
def admin_served(store: Path) -> Iterator[Served]:
    """A second server with the repository API on (an admin key, explicit model control), kept
    apart so that its loads and unloads do not reach the other tests' server."""
    port = free_port()
    process, url = start_server(
        store,
        CAMSERVE_GRPC_PORT=str(port),
        CAMSERVE_ADMIN_KEY=ADMIN_KEY,
        CAMSERVE_MODEL_CONTROL="explicit",
        CAMSERVE_LOG_LEVEL="WARNING",
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_grpc(target, process)
        yield Served(url, target)
    finally:
        stop_server(process)


@pytest.fixture(scope="package")
def admin_triton(admin_served: Served) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(admin_served.target)
    yield client
    client.close()
