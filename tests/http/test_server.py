"""The real thing: ``python -m app`` under uvicorn in a subprocess, talked to with httpx."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from PIL import Image
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from app.http.server import HeaderDeadlineProtocol
from tests.conftest import image_bytes
from tests.fixtures_models import FIXTURE_MODULE

ROOT = Path(__file__).resolve().parents[2]


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
        CAMSERVE_TRUSTED_MODULES=FIXTURE_MODULE,
        PYTHONPATH=str(ROOT),
        CAMSERVE_GRPC_PORT="",  # HTTP only: tests/grpc start gRPC on free ports
    )
    env.update(extra)
    return env


def spawn_server(store: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m app`` on a free port with these settings, just started (output piped)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env=environment(store, CAMSERVE_PORT=str(port), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def start_server(store: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """``spawn_server``, once ``/ready`` says 200."""
    process, url = spawn_server(store, **env)
    deadline = time.monotonic() + 60
    # One client for every poll: httpx.get built a client, and its TLS context, each time (~50
    # ms of CPU, beside a server starting on the same 2 cores). Polls no more often than those
    # did: each answer is an access-log line in the pipe that nobody reads until the server stops.
    with httpx.Client(timeout=1) as client:
        while True:
            try:
                if client.get(f"{url}/ready").status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"server did not start:\n{process.communicate()[0]}")
            time.sleep(0.2)


def stop_server(process: subprocess.Popen[str]) -> str:
    """SIGTERM to a server of ``start_server``, and what it printed; a traceback there fails."""
    process.terminate()
    try:
        output = process.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
    assert "Traceback" not in output, output
    return output


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[str]:
    process, url = start_server(
        store,
        CAMSERVE_API_KEY="key",
        CAMSERVE_MAX_UPLOAD_BYTES="65536",
        CAMSERVE_MAX_IMAGES="2",
        CAMSERVE_HEADER_TIMEOUT_S="0.5",
        CAMSERVE_BODY_TIMEOUT_S="0.5",
    )
    try:
        yield url
    finally:
        output = stop_server(process)
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


def test_curl_head_gets_the_headers_of_get(server: str) -> None:
    # uptime checkers and load balancers probe with HEAD; FastAPI's routes answered it 405
    head = subprocess.run(
        ["curl", "-sS", "-I", "--max-time", "10", f"{server}/health"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = head.splitlines()
    assert lines[0].split()[1] == "200", head
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    fields = {name.lower(): value for name, value in fields.items()}
    got = httpx.get(f"{server}/health")
    assert fields["content-length"] == got.headers["content-length"]
    assert fields["content-type"] == got.headers["content-type"]


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
    output = result.stdout + result.stderr
    assert output.count("cannot start: CAMSERVE_DEVICE=cuda:7") == 1
    assert "Traceback" not in output  # the line says it all (uvicorn logged the traceback too)


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_key_is_checked_before_the_body_is_read(server: str) -> None:
    """Headers announcing 150 MB without a key: the 401 comes before one body byte is sent."""
    with _raw(server) as sock:
        sock.sendall(
            b"POST /explain HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 150000000\r\n\r\n"
        )
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert json.loads(body)["error"]["code"] == "unauthorized"


def test_half_sent_headers_are_closed_with_408(server: str) -> None:
    with _raw(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
        answer = _read_all(sock)  # a socket timeout would raise here, not read a 408
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "header_timeout"
    with _raw(server) as idle:  # a connection that sends nothing is closed too
        assert _read_all(idle).startswith(b"HTTP/1.1 408")
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_stalled_body_is_answered_408(server: str) -> None:
    with _raw(server) as sock:
        sock.sendall(
            b"POST /explain HTTP/1.1\r\nHost: localhost\r\nX-API-Key: key\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 5000\r\n\r\n--x\r\n"
        )
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"


def test_sigterm_drains_then_cuts_late_work_with_json(store: Path) -> None:
    process, url = start_server(store, CAMSERVE_SHUTDOWN_GRACE_S="1")
    try:
        slow = {"model": "resnet", "method": "SSCAM", "num_samples": "32", "batch_size": "1"}
        image = [("file", ("a.png", image_bytes((40, 32)), "image/png"))]
        with httpx.Client(base_url=url, timeout=30) as client:
            answers: list[httpx.Response] = []
            worker = threading.Thread(
                target=lambda: answers.append(client.post("/explain", files=image, data=slow))
            )
            worker.start()
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["draining"] is True
            refused = client.post("/predict", files=image)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            worker.join(30)
        (cut,) = answers
        assert cut.status_code == 503, cut.text
        assert cut.headers["content-type"] == "application/json"
        assert cut.json()["error"]["code"] == "shutting_down"
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in output and "Internal Server Error" not in output
    messages = [json.loads(line)["message"] for line in output.splitlines() if line.strip()]
    assert any(m.startswith("draining") for m in messages)
    assert any("cutting them with 503 shutting_down" in m for m in messages)


def test_uvicorn_gets_its_limits_from_the_settings(store: Path) -> None:
    from app.http.server import DrainingServer, HeaderDeadlineProtocol, build_server
    from app.settings import Settings

    settings = Settings(
        model_store=store,
        device="cpu",
        max_connections=123,
        keep_alive_s=3,
        header_timeout_s=7,
        shutdown_grace_s=9,
        probe_connections=5,
        max_header_fields=50,
        max_header_bytes=32768,
    )
    server = build_server(settings)
    assert isinstance(server, DrainingServer)
    config = server.config
    assert config.limit_concurrency == 123 and config.timeout_keep_alive == 3
    assert issubclass(config.http, HeaderDeadlineProtocol)  # type: ignore[arg-type]
    assert config.http.header_timeout_s == 7  # type: ignore[union-attr]
    assert config.http.probes.bound == 5  # type: ignore[union-attr]
    assert config.http.max_header_fields == 50  # type: ignore[union-attr]
    assert config.http.max_header_bytes == 32768  # type: ignore[union-attr]
    assert server.lifecycle.grace_s == 9


def test_a_drained_server_exits_0_so_make_serve_reports_no_failure(store: Path) -> None:
    # Dying by the signal (uvicorn re-raises it) made `make serve` print "*** Terminated".
    process, _ = start_server(store)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output


def _keep_open(url: str) -> socket.socket:
    """A connection that asked for /health and now idles (kept alive), holding its place."""
    sock = _raw(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_probes_pass_and_refusals_are_json_at_the_connection_cap(store: Path) -> None:
    process, url = start_server(
        store, CAMSERVE_MAX_CONNECTIONS="3", CAMSERVE_KEEP_ALIVE_S="60", CAMSERVE_METRICS="true"
    )
    held = [_keep_open(url) for _ in range(3)]
    try:
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(url + path, timeout=10).status_code == 200, path
        refused = httpx.post(url + "/predict", files=[("file", ("a.png", image_bytes()))])
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["retry-after"] == "1"
        assert "CAMSERVE_MAX_CONNECTIONS" in refused.json()["error"]["message"]
        assert httpx.get(url + "/models", timeout=10).status_code == 503
    finally:
        for sock in held:
            sock.close()
        process.terminate()
        process.communicate(timeout=30)


def test_bytes_that_are_not_http_get_a_json_400(server: str) -> None:
    for request in (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nBad\x01Header: y\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ):
        with _raw(server) as sock:
            sock.sendall(request)
            answer = _read_all(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"]["code"] == "bad_request"


def test_a_long_url_gets_json(server: str) -> None:
    with _raw(server) as sock:
        sock.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    json.loads(body)


def _flat_png(side: int) -> bytes:
    """An all-black RGB PNG: a few KB that decode to ``side`` x ``side`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_resident_memory_stays_within_the_decode_budget(store: Path) -> None:
    """Requests of small flat PNGs that decode to ~50 MB each arrive eight at a time while the
    one model slot is busy: with a budget of one request's worth, the server's resident memory
    grows by about that, not by eight requests' worth."""
    image = _flat_png(1800)  # 3.24 MP: 26 MB decoded (8 bytes a pixel at the peak)
    per_request = 2 * 1800 * 1800 * 8
    process, url = start_server(
        store,
        CAMSERVE_DECODE_BUDGET_BYTES=str(per_request + 1024**2),
        CAMSERVE_MAX_IMAGE_PIXELS=str(1800 * 1800),
        CAMSERVE_REQUEST_TIMEOUT_S="120",
        CAMSERVE_MAX_MODEL_SLOTS="1",
    )
    try:
        server = psutil.Process(process.pid)
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.post("/predict", files=[("file", ("w.png", _flat_png(64)))]).is_success
            slow = {"model": "resnet", "method": "SSCAM", "num_samples": "64", "batch_size": "1"}
            job = client.post("/jobs", files=[("file", ("s.png", image_bytes()))], data=slow)
            job_url = job.json()["url"]
            while client.get(job_url).json()["progress"]["done"] == 0:  # the slot is taken
                time.sleep(0.05)
            baseline = server.memory_info().rss
            peak = baseline
            statuses: list[int] = []

            def send() -> None:
                parts = [("file", (f"{i}.png", image, "image/png")) for i in range(2)]
                statuses.append(httpx.post(f"{url}/predict", files=parts, timeout=120).status_code)

            senders = [threading.Thread(target=send) for _ in range(8)]
            for sender in senders:
                sender.start()
            until = time.monotonic() + 7  # all eight have decoded by now (~4 s), unless they wait
            while time.monotonic() < until:
                peak = max(peak, server.memory_info().rss)
                time.sleep(0.005)
            client.delete(job_url)
            while any(sender.is_alive() for sender in senders):
                peak = max(peak, server.memory_info().rss)
                time.sleep(0.005)
        assert statuses == [200] * 8, statuses
        grown = peak - baseline
        # One request's decoding (~70 MB measured), plus slack; without the budget: 224 MB.
        assert grown < per_request + 48 * 1024**2, f"grew {grown / 1024**2:.0f} MiB"
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_an_uploader_without_the_key_gets_the_401_not_a_reset(server: str) -> None:
    """An asyncio client sends its whole body before it reads: the gate reads (and drops) the
    body of its refusal, so the client sees the 401 instead of a reset connection."""

    async def main() -> list[int | str]:
        outcomes: list[int | str] = []
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            for round_ in range(8):
                sizes = [(1 + (round_ + i) % 5) * 1024 * 1024 for i in range(4)]

                async def upload(size: int) -> int | str:
                    try:
                        response = await client.post(
                            "/explain", files=[("file", ("a.png", b"\0" * size, "image/png"))]
                        )
                    except httpx.TransportError as error:
                        return type(error).__name__
                    assert response.json()["error"]["code"] == "unauthorized"
                    return response.status_code

                outcomes += await asyncio.gather(*(upload(size) for size in sizes))
        return outcomes

    assert asyncio.run(main()) == [401] * 32


def test_a_flood_of_tiny_headers_is_cut_with_431(server: str) -> None:
    """A million tiny headers: refused once the 101st arrives, the connection closed; the rest
    is never parsed."""
    with _raw(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        try:
            for _ in range(100):
                sock.sendall(b"a: b\r\n" * 10_000)
        except OSError:  # closed by the server, as it should be
            pass
        answer = _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "headers_too_large" and "CAMSERVE_MAX_HEADER_FIELDS" in error["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_huge_header_is_refused_with_431(server: str) -> None:
    with _raw(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
        try:
            for _ in range(320):  # 20 MB, never ending its line
                sock.sendall(b"v" * 65536)
        except OSError:
            pass
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"
    # Just under the caps is served.
    headers = {f"x-h{i}": "v" * 400 for i in range(90)}
    assert httpx.get(f"{server}/health", headers=headers).status_code == 200


def test_a_forwarded_for_header_is_believed_only_from_trusted_proxies(store: Path) -> None:
    """From loopback, a new X-Forwarded-For for each job does not make a new client unless
    loopback is a trusted proxy (CAMSERVE_FORWARDED_ALLOW_IPS)."""
    process, url = start_server(store, CAMSERVE_MAX_JOBS_PER_CLIENT="1")
    slow = {"model": "resnet", "method": "SSCAM", "num_samples": "8", "batch_size": "1"}
    try:
        first = httpx.post(
            f"{url}/jobs",
            files=[("file", ("a.png", image_bytes()))],
            data=slow,
            headers={"X-Forwarded-For": "192.0.2.1"},
        )
        assert first.status_code == 202, first.text
        for n in range(2, 5):
            dodge = httpx.post(
                f"{url}/jobs",
                files=[("file", ("a.png", image_bytes()))],
                data=slow,
                headers={"X-Forwarded-For": f"192.0.2.{n}"},
            )
            assert dodge.status_code == 503, dodge.text
            assert "CAMSERVE_MAX_JOBS_PER_CLIENT" in dodge.json()["error"]["message"]
        httpx.delete(f"{url}{first.headers['location']}")
    finally:
        process.kill()  # its output is not looked at
        process.communicate(timeout=30)
    from app.http.server import build_server
    from app.settings import Settings

    config = build_server(Settings(model_store=store, device="cpu")).config
    assert config.proxy_headers is False
    trusted = Settings(model_store=store, device="cpu", forwarded_allow_ips="10.0.0.0/8")
    config = build_server(trusted).config
    assert config.proxy_headers is True and config.forwarded_allow_ips == "10.0.0.0/8"


def test_a_closed_event_stream_gives_its_place_back(store: Path) -> None:
    process, url = start_server(store, CAMSERVE_MAX_EVENT_STREAMS_PER_CLIENT="1")
    slow = {"model": "resnet", "method": "SSCAM", "num_samples": "8", "batch_size": "1"}
    try:
        job = httpx.post(f"{url}/jobs", files=[("file", ("a.png", image_bytes()))], data=slow)
        events = f"{url}{job.headers['location']}/events"
        for _ in range(3):  # each time: one stream open, a second refused, then closed
            with httpx.stream("GET", events, timeout=10) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                assert next(lines).startswith("id: ")
                refused = httpx.get(events)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/jobs/{job.json()['id']}").status_code != 200:
                time.sleep(0.05)  # (the job is still there)
            while True:  # the server notices the disconnect and frees the place
                with httpx.stream("GET", events, timeout=10) as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the closed stream kept its place"
                time.sleep(0.05)
        httpx.delete(f"{url}{job.headers['location']}")
    finally:
        process.kill()
        process.communicate(timeout=30)


def _answer(sock: socket.socket) -> bytes:
    """The head of one answer on a kept-alive connection, its body (by Content-Length) read."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while length > 0:
        length -= len(sock.recv(length))
    return head


def test_a_flood_of_bad_requests_does_not_flood_the_log(store: Path) -> None:
    """Each request over the header cap gets its 431, each malformed one its 400, and each one
    asking for a protocol upgrade its answer, but the log gets one line per kind for them all:
    uvicorn wrote a warning per request (found by a hostile review: 1000 requests of an unknown
    method and 1000 upgrade requests on one connection, 2000 lines in 1.7 s; now 2)."""
    process, url = start_server(store)
    try:
        for _ in range(20):
            with _raw(url) as sock:
                sock.sendall(
                    b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + b"a: b\r\n" * 200 + b"\r\n"
                )
                assert _read_all(sock).startswith(b"HTTP/1.1 431")
        for request in (
            b"NOT HTTP AT ALL\r\n\r\n",
            b"BREW / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ) * 10:
            with _raw(url) as sock:
                sock.sendall(request)
                assert _read_all(sock).startswith(b"HTTP/1.1 400")
        with _raw(url) as sock:
            for _ in range(20):
                sock.sendall(
                    b"GET /health HTTP/1.1\r\nHost: localhost\r\n"
                    b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                )
                assert _answer(sock).startswith(b"HTTP/1.1 200")
    finally:
        output = stop_server(process)
    messages = [json.loads(line)["message"] for line in output.splitlines() if line.strip()]
    refusals = [m for m in messages if "headers over the cap" in m]
    assert len(refusals) == 1 and "refused 1 request(s)" in refusals[0], refusals
    malformed = [m for m in messages if "not valid HTTP/1.1" in m]
    assert len(malformed) == 1 and "answered 1 request(s)" in malformed[0], malformed
    upgrades = [m for m in messages if "upgrade the connection" in m]
    assert len(upgrades) == 1 and "served 1 request(s)" in upgrades[0], upgrades
    assert not any("Invalid HTTP request" in m or "Unsupported upgrade" in m for m in messages)


class _Transport(asyncio.Transport):
    """A connection's transport that keeps what is written, for a protocol driven by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _answer_without_reading(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"no"})


async def _answered_connection() -> tuple[HeaderDeadlineProtocol, _Transport]:
    """A protocol that has answered a request declaring a 1 MB body without reading it."""
    config = uvicorn.Config(_answer_without_reading, timeout_keep_alive=5, log_config=None)
    config.load()
    protocol = HeaderDeadlineProtocol(config=config, server_state=ServerState(), app_state={})
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(
        b"GET /nothing HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n"
    )
    for _ in range(10):
        await asyncio.sleep(0)
    assert transport.written.startswith(b"HTTP/1.1 404")
    assert protocol.timeout_keep_alive_task is not None
    return protocol, transport


def test_the_rest_of_an_answered_body_does_not_keep_the_connection_open() -> None:
    """A client that trickles the rest of a large Content-Length after its answer held the
    connection for ever: every byte cancelled uvicorn's keep-alive timer and nothing armed it
    again. The timer now keeps running through those bytes."""

    async def main() -> None:
        protocol, transport = await _answered_connection()
        timer = protocol.timeout_keep_alive_task
        for _ in range(3):
            protocol.data_received(b"x")
        assert protocol.timeout_keep_alive_task is timer
        assert timer is not None and not timer.cancelled()
        timer._run()  # its time has come: the connection closes
        assert transport.closed

    asyncio.run(main())


def test_a_request_after_an_answered_body_cancels_the_keep_alive_timer() -> None:
    """The end of the dropped body and the next request in one piece: the next request is
    served, and the old timer cannot close the connection under it."""

    async def main() -> None:
        protocol, transport = await _answered_connection()
        timer = protocol.timeout_keep_alive_task
        protocol.data_received(b"x" * (1000000 - 1))
        assert protocol.timeout_keep_alive_task is timer  # the body ended, nothing began
        protocol.data_received(b"x" + b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert timer is not None and timer.cancelled()
        for _ in range(10):
            await asyncio.sleep(0)
        assert transport.written.count(b"HTTP/1.1 404") == 2
        assert not transport.closed

    asyncio.run(main())


@pytest.mark.parametrize(("grpc_port", "wanted"), [(None, 123), (50051, 246)])
def test_the_open_file_limit_is_raised_for_grpc_connections_too(
    store: Path, monkeypatch: pytest.MonkeyPatch, grpc_port: int | None, wanted: int
) -> None:
    # gRPC's connections have their own cap of CAMSERVE_MAX_CONNECTIONS beside HTTP's.
    from app.http import server
    from app.settings import Settings

    asked: list[int] = []
    monkeypatch.setattr(server, "raise_open_file_limit", asked.append)
    settings = Settings(model_store=store, device="cpu", max_connections=123, grpc_port=grpc_port)
    server.build_server(settings)
    assert asked == [wanted]
