"""``python -m app --workers N``: N service processes on one port, each answering, all stopped
cleanly by one SIGTERM to the parent; several workers without a shared job store are refused."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from app.workers import Supervisor
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


def _listens_on(process: psutil.Process) -> set[int]:
    return {
        s.laddr.port  # type: ignore[attr-defined]
        for s in _connections(process)
        if s.status == psutil.CONN_LISTEN  # type: ignore[attr-defined]
    }


def _holder(children: list[psutil.Process], port: int, client_port: int) -> int:
    """The worker holding the server end of the connection from ``client_port``."""
    for child in children:
        for s in _connections(child):
            if s.laddr.port == port and s.raddr and s.raddr.port == client_port:  # type: ignore[attr-defined]
                return int(child.pid)
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics on a new connection, as Prometheus reads it: each sample's value, summed over
    the labels other than route, model, version and pid."""
    kept = {"route", "model", "version", "pid"}
    with httpx.Client() as client:
        text = client.get(f"{url}/metrics", timeout=10).text
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in kept))
            key = (sample.name, labels)
            values[key] = values.get(key, 0.0) + sample.value
    return values


def test_two_workers_share_the_port_and_stop_on_sigterm(
    store: Path, redis_server: RedisServer
) -> None:
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    parent = subprocess.Popen(
        [sys.executable, "-m", "app", "--workers", "2"],
        cwd=ROOT,
        env=environment(
            store,
            CAMSERVE_PORT=str(port),
            CAMSERVE_GRPC_PORT=str(grpc_port),
            CAMSERVE_JOB_STORE=redis_server.url(3),
        ),
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
            # Each worker listens on both ports, HTTP's and gRPC's.
            listening = [c for c in children if _listens_on(c) >= {port, grpc_port}]
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
        # Each worker answered some: a scrape, whichever worker answers it, counts all 16.
        for _ in range(6):
            scraped = _scrape(url)
            explained = (("model", "tiny"), ("route", "/explain"), ("version", "1"))
            assert scraped[("camserve_requests_total", explained)] == 16, scraped
            assert scraped[("camserve_queue_depth", ())] == 0
            assert scraped[("camserve_model_ready", (("model", "tiny"), ("version", "1")))] == 1
            pids = {
                dict(labels)["pid"]
                for name, labels in scraped
                if name == "camserve_worker_resident_memory_bytes"
            }
            assert pids == {str(c.pid) for c in children}
            # Triton's statistics are read from the same shared metrics.
            with httpx.Client() as client:
                stats = client.get(f"{url}/v2/models/tiny/stats", timeout=10).json()
            assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 16
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


_CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # drains, as a worker does
mark = os.environ.get("CAMSERVE_FAIL_MARK")
if mark:  # the first child to get here fails with status 3
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL))
        sys.exit(3)
    except FileExistsError:
        pass
time.sleep(60)
sys.exit(5)  # never reached in the tests: they stop the children first
"""


def test_a_signal_to_the_supervisor_reaches_every_worker() -> None:
    supervisor = Supervisor(3, command=(sys.executable, "-c", _CHILD))
    sessions: list[int] = []

    def stop() -> None:
        sessions.extend(os.getsid(child.pid) for child in supervisor.children)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(2.0, stop)
    timer.start()
    try:
        assert supervisor.run() == 0
    finally:
        timer.cancel()
    assert len(supervisor.children) == 3
    assert [child.returncode for child in supervisor.children] == [0, 0, 0]
    # Each in a session of its own: a terminal's Ctrl-C reaches the supervisor alone, and each
    # worker gets the signal once (a second one would cut its drain short).
    assert len(sessions) == 3 and os.getsid(0) not in sessions


def test_a_worker_that_dies_stops_the_rest_and_gives_its_status(tmp_path: Path) -> None:
    # Settings given as arguments reach the children as CAMSERVE_ variables.
    mark = tmp_path / "failed"
    supervisor = Supervisor(2, {"fail_mark": mark}, command=(sys.executable, "-c", _CHILD))
    assert supervisor.run() == 3
    assert mark.exists()
    codes = sorted(child.returncode for child in supervisor.children)
    # The other was stopped: drained (0), or by the signal itself if it had not set up yet.
    assert codes in ([0, 3], [-signal.SIGTERM, 3]), codes
