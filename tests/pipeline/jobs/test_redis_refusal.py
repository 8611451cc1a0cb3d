"""A Redis that refuses the job store, against real servers: at startup (a missing or wrong
password, a database index past the server's ``databases``, a server that is no Redis) the
service does not start, and says which setting to fix; when Redis only comes back refusing,
the 503s name the cause and the fix. A Redis merely away still lets the service start."""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import ConfigurationError
from tests.conftest import assert_error
from tests.http.routes.test_jobs import finished, submit, wait_for
from tests.pipeline.jobs.test_redis_store import until
from tests.redis_server import RedisServer

PASSWORD = "s3cret"


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that asks for ``PASSWORD`` (64 databases, like every test server)."""
    server = RedisServer(tmp_path, password=PASSWORD)
    server.start()
    yield server
    server.stop()


class _NotRedis(socketserver.BaseRequestHandler):
    """Answers whatever it is sent as an HTTP server does, and keeps the connection open."""

    def handle(self) -> None:
        self.request.recv(1024)
        self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.request.recv(1024)


@pytest.fixture
def http_port() -> Iterator[int]:
    """A loopback port where an HTTP-like server, not Redis, answers."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _NotRedis)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def refused_at_startup(make_client: Callable[..., TestClient], **settings: object) -> str:
    """The ConfigurationError message of a service that must not start with ``settings``."""
    with pytest.raises(ConfigurationError) as refused:
        make_client(**settings)
    return str(refused.value)


def test_a_database_index_past_the_servers_stops_startup(
    make_client: Callable[..., TestClient],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.CRITICAL, logger="app.pipeline.jobs.redis_store"):
        message = refused_at_startup(make_client, job_store=redis_server.url(64))
    assert message.startswith("CAMSERVE_JOB_STORE: ")
    assert f"127.0.0.1:{redis_server.port}/64 has no database 64" in message
    assert "DB index is out of range" in message and "redis://host:6379/0" in message
    assert [r.getMessage() for r in caplog.records] == [f"cannot start: {message}"]


def test_a_missing_password_stops_startup_naming_the_password_setting(
    make_client: Callable[..., TestClient], locked_server: RedisServer
) -> None:
    message = refused_at_startup(make_client, job_store=locked_server.url())
    assert message.startswith("CAMSERVE_JOB_STORE_PASSWORD: authentication failed: ")
    assert "requires a password and none is set" in message
    assert "set CAMSERVE_JOB_STORE_PASSWORD to the server's password" in message


def test_a_wrong_password_stops_startup_naming_where_it_came_from(
    make_client: Callable[..., TestClient], locked_server: RedisServer
) -> None:
    message = refused_at_startup(
        make_client, job_store=locked_server.url(), job_store_password="nope"
    )
    assert message.startswith("CAMSERVE_JOB_STORE_PASSWORD: authentication failed: ")
    assert "refused the password" in message and "nope" not in message
    in_url = locked_server.url().replace("redis://", "redis://:nope@")
    message = refused_at_startup(make_client, job_store=in_url, job_store_password=PASSWORD)
    assert message.startswith("CAMSERVE_JOB_STORE: authentication failed: ")  # the URL's wins
    assert "set the password in the URL" in message and "nope" not in message


def test_a_server_that_is_no_redis_stops_startup(
    make_client: Callable[..., TestClient], http_port: int
) -> None:
    message = refused_at_startup(make_client, job_store=f"redis://127.0.0.1:{http_port}/0")
    assert message.startswith("CAMSERVE_JOB_STORE: the server at ")
    assert "does not answer in the Redis protocol" in message
    assert "check the host and port" in message


def job_store_refusal(client: TestClient) -> str | None:
    """The 503 message of a request that needs the job store; None once the store answers."""
    response = client.get("/jobs/no-such-job")
    if response.status_code == 404:
        return None
    message = assert_error(response, 503, "job_store_unavailable")
    assert response.headers["retry-after"] == "5"
    return message


@pytest.mark.parametrize(
    ("changes", "db", "expected"),
    [
        (
            {},
            0,
            "authentication failed: the Redis server at 127.0.0.1:{port}/0 requires a "
            "password and none is set; set CAMSERVE_JOB_STORE_PASSWORD to the server's password",
        ),
        (
            {"job_store_password": "nope"},
            0,
            "authentication failed: the Redis server at 127.0.0.1:{port}/0 refused the "
            "password (invalid username-password pair or user is disabled); set "
            "CAMSERVE_JOB_STORE_PASSWORD to the server's password",
        ),
        ({"job_store_password": PASSWORD}, 64, "has no database 64 (DB index is out of range"),
    ],
    ids=["no-password", "wrong-password", "db-index"],
)
def test_redis_away_at_startup_then_refusing_names_the_cause_in_the_503(
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    changes: dict[str, object],
    db: int,
    expected: str,
) -> None:
    server = RedisServer(tmp_path, password=PASSWORD)  # not started yet: away at startup
    client = make_client(job_store=server.url(db), **changes)
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["job_store"]["available"] is False
    assert ready.json()["job_store"]["problem"] == (
        f"CAMSERVE_JOB_STORE: the Redis server at 127.0.0.1:{server.port}/{db} does not answer; "
        "/jobs answers 503 until it does (POST /explain still works)"
    )
    assert "does not answer" in (job_store_refusal(client) or "")
    server.start()
    try:
        until(lambda: "does not answer" not in (job_store_refusal(client) or ""), timeout=20)
        message = job_store_refusal(client) or ""
        assert message.startswith("The job store (Redis) refuses this replica: ")
        assert expected.format(port=server.port) in message
        assert "POST /explain still works" in message and PASSWORD not in message
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["job_store"]["available"] is False
        problem = ready.json()["job_store"]["problem"]
        assert problem.startswith("CAMSERVE_JOB_STORE") and PASSWORD not in problem
        assert expected.format(port=server.port) in problem
    finally:
        server.stop()


def test_the_store_comes_back_once_redis_stops_refusing(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, password=PASSWORD)
    client = make_client(job_store=server.url())
    server.start()
    try:
        until(lambda: "authentication failed" in (job_store_refusal(client) or ""), timeout=20)
        server.client().config_set("requirepass", "")  # the server drops its password
        until(lambda: job_store_refusal(client) is None, timeout=20)
        store = client.get("/ready").json()["job_store"]
        assert store["available"] is True and store["problem"] is None
        job = submit(client, method="GradCAM")
        assert wait_for(client, job["id"], finished)["status"] == "succeeded"
    finally:
        server.stop()


def test_a_user_without_the_commands_it_needs_stops_startup(
    make_client: Callable[..., TestClient], locked_server: RedisServer
) -> None:
    locked_server.client().acl_setuser(
        "pinger", enabled=True, passwords=["+pw"], keys=["*"], commands=["+ping", "+client"]
    )
    url = locked_server.url().replace("redis://", "redis://pinger:pw@")
    message = refused_at_startup(make_client, job_store=url)
    assert message.startswith("CAMSERVE_JOB_STORE: the Redis server at ")
    assert "does not let the URL's user run a command the job store needs" in message
    assert "no permissions to run the 'xgroup|create' command" in message
