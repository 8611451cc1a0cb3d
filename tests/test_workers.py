"""``python -m app --workers N``: N service processes on one port, each answering, all stopped
cleanly by one SIGTERM to the parent; several workers without a shared job store are refused."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import image_bytes
from tests.http.test_server import ROOT, environment
from tests.redis_server import RedisServer, free_port


def _connections(process: psutil.Process) -> list[object]:
    # psutil 6 renamed connections() net_connections().
    listed = getattr(process, "net_connections", None) or process.connections
    return list(listed("tcp"))


def _all_ready(url: str, tries: int = 16) -> bool:
    """/ready says 200 on ``tries`` new connections in a row (each lands on either worker)."""
    for _ in range(tries):
        try:
            with httpx.Client() as client:
                if client.get(f"{url}/ready", timeout=2).status_code != 200:
                    return False
        except httpx.TransportError:
            return False
    return True


def _holder(children: list[psutil.Process], port: int, client_port: int) -> int:
    """The worker holding the server end of the connection from ``client_port``."""
    for child in children:
        for s in _connections(child):
            if s.laddr.port == port and s.raddr and s.raddr.port == client_port:  # type: ignore[attr-defined]
                return int(child.pid)
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def test_two_workers_share_the_port_and_stop_on_sigterm(
    store: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    parent = subprocess.Popen(
        [sys.executable, "-m", "app", "--workers", "2"],
        cwd=ROOT,
        env=environment(store, CAMSERVE_PORT=str(port), CAMSERVE_JOB_STORE=redis_server.url(3)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        children: list[psutil.Process] = []
        while True:  # both workers listening, then ready
            assert parent.poll() is None, parent.communicate()[0]
            assert time.monotonic() < deadline, "the workers did not start"
            children = psutil.Process(parent.pid).children()
            listening = [
                c
                for c in children
                if any(
                    s.status == psutil.CONN_LISTEN and s.laddr.port == port  # type: ignore[attr-defined]
                    for s in _connections(c)
                )
            ]
            if len(listening) == 2 and _all_ready(url):
                break
            time.sleep(0.2)
        assert len(children) == 2 and parent.pid not in {c.pid for c in children}

        request = httpx.Request(
            "POST",
            f"{url}/explain",
            files=[("file", ("a.png", image_bytes((40, 32)), "image/png"))],
        )
        body, headers = request.read(), dict(request.headers)
        answered_by = []
        for _ in range(16):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:  # a new connection each: the kernel picks its worker
                connection.request("POST", "/explain", body=body, headers=headers)
                response = connection.getresponse()
                assert response.status == 200, response.read()
                response.read()
                assert connection.sock is not None
                mine = connection.sock.getsockname()[1]
                answered_by.append(_holder(children, port, mine))
            finally:
                connection.close()
        assert set(answered_by) == {c.pid for c in children}, answered_by
    finally:
        parent.terminate()
        try:
            output = parent.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            parent.kill()
            raise
    assert parent.returncode == 0, output
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert sum("camserve 0.1.0 on device cpu" in r["message"] for r in records) == 2
    assert "Traceback" not in output


def test_several_workers_need_a_shared_job_store(store: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "--workers", "2"],
        cwd=ROOT,
        env=environment(store, CAMSERVE_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "CAMSERVE_WORKERS=2 needs a shared job store" in done.stderr
    assert "CAMSERVE_JOB_STORE=redis://" in done.stderr
