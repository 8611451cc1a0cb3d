"""The gRPC server's life in ``python -m app``: a taken port stops startup with a clear message;
SIGTERM drains it with HTTP and the process exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import tritonclient.grpc as grpcclient

from app.grpc.server import max_message_bytes
from tests.grpc.conftest import wait_for_grpc
from tests.http.test_server import ROOT, environment, free_port, start_server


def test_the_message_limit_fits_every_image_at_the_upload_limit() -> None:
    assert max_message_bytes(1000, 3) == 3 * 1004 + 64 * 1024


def test_a_taken_grpc_port_stops_startup_and_says_which_setting(store: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=environment(store, CAMSERVE_PORT=str(free_port()), CAMSERVE_GRPC_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CAMSERVE_GRPC_PORT" in result.stderr and str(port) in result.stderr


def test_sigterm_stops_grpc_with_http_and_exits_cleanly(store: Path) -> None:
    port = free_port()
    process, _ = start_server(store, CAMSERVE_GRPC_PORT=str(port))
    target = f"127.0.0.1:{port}"
    try:
        wait_for_grpc(target, process)
        client = grpcclient.InferenceServerClient(target)
        assert client.is_server_ready()
        client.close()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            still_open = True
        except grpc.FutureTimeoutError:
            still_open = False
    assert not still_open
