"""The Redis job store across replicas: any replica answers, a dead replica's job runs again,
attempts are bounded, a draining replica hands its jobs back, Redis may go away and return."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import exceptions as redis_errors

from app.pipeline.decoding import Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.fairness import current_caller
from app.pipeline.jobs.base import JobEvent
from app.pipeline.jobs.record import Job
from app.pipeline.jobs.redis_store import GROUP, QUEUE, RedisJobStore, _Running
from app.pipeline.jobs.work import Outcome
from tests.conftest import assert_error, files, image_bytes
from tests.http.routes.test_jobs import SLOW, finished, submit, wait_for
from tests.redis_server import RedisServer

#: 256 masked forwards of resnet18, one per chunk: a second or two of work.
MEDIUM = {"model": "resnet", "method": "ScoreCAM", "batch_size": "1"}
_databases = itertools.cycle(range(1, 64))


@pytest.fixture
def replicas(
    make_client: Callable[..., TestClient], redis_server: RedisServer
) -> Callable[..., TestClient]:
    """Start replicas sharing one emptied Redis database (``replicas(**settings)``)."""
    db = next(_databases)
    redis_server.client(db).flushdb()

    def start(**changes: object) -> TestClient:
        return make_client(job_store=redis_server.url(db), **changes)

    return start


def store_of(client: TestClient) -> RedisJobStore:
    store = client.app.state.jobs  # type: ignore[attr-defined]
    assert isinstance(store, RedisJobStore)
    return store


def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_any_replica_answers_follows_and_cancels_any_job(
    replicas: Callable[..., TestClient],
) -> None:
    a, b = replicas(), replicas()
    job = submit(a, **SLOW)
    running = wait_for(b, job["id"], lambda v: v["progress"]["done"] > 0)
    assert running["status"] == "running"
    with b.stream("GET", f"/jobs/{job['id']}/events") as stream:
        first = next(line for line in stream.iter_lines() if line.startswith("event: "))
    assert first == "event: progress"
    cancelled = b.delete(f"/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    # The replica that ran it stops at its next chunk and frees its slot.
    until(lambda: not store_of(a)._running and not store_of(b)._running, timeout=10)
    assert a.get(f"/jobs/{job['id']}").json()["progress"]["done"] < 256 * 8
    quick = submit(b, method="GradCAM")
    assert wait_for(a, quick["id"], finished)["status"] == "succeeded"


def queue_without_running(client: TestClient) -> str:
    """A job queued by ``client``'s store while none of its readers takes jobs."""
    store = store_of(client)
    client.app.state.lifecycle.begin_drain()  # type: ignore[attr-defined]
    until(lambda: all(task.done() for task in store._tasks[1:]), timeout=10)
    upload = Upload("a.png", image_bytes())
    view = client.portal.call(  # type: ignore[union-attr]
        partial(store.create, None, [upload], ExplainParams(method="GradCAM"), client="x")
    )
    return view.id


def claim_as_dead_replica(server: RedisServer, db: int, job_id: str, attempts: int) -> None:
    """Take the job's entry as a replica that dies at once (it never acknowledges it)."""
    redis = server.client(db)
    read = redis.xreadgroup(GROUP, "dead-replica", {QUEUE: ">"}, count=1)
    assert read and read[0][1][0][1][b"id"].decode() == job_id
    redis.hset(
        f"camserve:job:{job_id}",
        mapping={"status": "running", "owner": "dead-replica", "attempts": attempts},
    )


def db_of(client: TestClient) -> int:
    return int(client.app.state.settings.job_store.rsplit("/", 1)[1])  # type: ignore[attr-defined]


def test_a_dead_replicas_job_runs_again_after_the_lease(
    replicas: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    first = replicas()
    job_id = queue_without_running(first)
    claim_as_dead_replica(redis_server, db_of(first), job_id, attempts=1)
    second = replicas(job_lease_s=1)
    view = wait_for(second, job_id, finished)
    assert view["status"] == "succeeded" and view["result"]["method"] == "GradCAM"
    record = redis_server.client(db_of(first)).hgetall(f"camserve:job:{job_id}")
    assert record[b"attempts"] == b"2" and record[b"owner"].decode() == store_of(second).consumer


def test_a_job_started_too_often_fails_with_that_reason(
    replicas: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    first = replicas()
    job_id = queue_without_running(first)
    claim_as_dead_replica(redis_server, db_of(first), job_id, attempts=2)
    second = replicas(job_lease_s=1, job_max_attempts=2)
    view = wait_for(second, job_id, finished)
    assert view["status"] == "failed" and view["error"]["code"] == "job_attempts_exhausted"
    assert "CAMSERVE_JOB_MAX_ATTEMPTS=2" in view["error"]["message"]


def test_a_draining_replica_hands_its_job_back_to_another(
    replicas: Callable[..., TestClient],
) -> None:
    first = replicas(max_model_slots=1)
    job = submit(first, **MEDIUM)
    wait_for(first, job["id"], lambda v: v["progress"]["done"] > 0)
    lifecycle = first.app.state.lifecycle  # type: ignore[attr-defined]
    lifecycle.grace_s = 0.0
    lifecycle.begin_drain()
    first.portal.call(lambda: lifecycle.ready_to_exit())  # type: ignore[union-attr]
    assert wait_for(first, job["id"], lambda v: v["status"] == "queued")["started"] is None
    second = replicas()
    view = wait_for(second, job["id"], finished)
    assert view["status"] == "succeeded", view["error"]
    assert store_of(second).jobs_run == 1 and store_of(first).jobs_run == 0


def test_consumers_of_replicas_gone_are_deleted_but_not_those_holding_a_job(
    replicas: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    """Every replica start adds a consumer to the queue's group; one that died (SIGKILL, OOM)
    never deletes its own. The watcher deletes those idle with nothing pending, and a replica
    that closes deletes its own, so the group does not grow with every restart."""
    first = replicas()
    job_id = queue_without_running(first)
    claim_as_dead_replica(redis_server, db_of(first), job_id, attempts=1)  # holds a job
    redis = redis_server.client(db_of(first))
    for name in ("gone-1", "gone-2"):
        redis.xgroup_createconsumer(QUEUE, GROUP, name)
    store = store_of(first)

    def names() -> set[str]:
        return {c["name"].decode() for c in redis.xinfo_consumers(QUEUE, GROUP)}

    assert {"gone-1", "gone-2", "dead-replica"} <= names()
    assert first.portal.call(store._forget_consumers, 0) >= 2  # type: ignore[union-attr]
    assert "dead-replica" in names() and not {"gone-1", "gone-2"} & names()
    second = replicas(job_lease_s=1)
    wait_for(second, job_id, finished)
    until(lambda: store_of(second).consumer in names(), timeout=10)
    second.portal.call(store_of(second).close)  # type: ignore[union-attr]
    assert store_of(second).consumer not in names()


def test_a_jobs_follower_ends_with_its_run_even_without_a_cancel(
    replicas: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    """Python 3.11's wait_for may swallow the cancel sent to the follower as its wait ends; the
    follower must still stop once the run is over, or the job stays 'running' for ever."""
    client = replicas()
    store = store_of(client)
    job = Job(id="f" * 24)
    redis_server.client(db_of(client)).hset(
        f"camserve:job:{job.id}", mapping={"status": "running", "owner": store.consumer}
    )

    async def scenario() -> None:
        async def run() -> Outcome:
            return Outcome("succeeded")

        task = asyncio.create_task(run())
        await task
        await asyncio.wait_for(store._follow(_Running(job, "0-0", task)), 5)

    client.portal.call(scenario)  # type: ignore[union-attr]


def test_a_jobs_follower_outlives_a_write_that_redis_refuses(
    replicas: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    """Redis full past maxmemory (or read-only after a failover) refuses a progress write with
    an error that is no lost connection: the follower must try again at its next turn. If it
    died, the run would go on with no lease (another replica runs the job too) and a DELETE
    would not stop it."""
    client = replicas()
    store = store_of(client)
    job = Job(id="g" * 24)
    redis_server.client(db_of(client)).hset(
        f"camserve:job:{job.id}", mapping={"status": "cancelled", "owner": store.consumer}
    )
    script = store._script
    refused: list[str] = []

    async def full_once(name: str, keys: Sequence[str], args: Sequence[object]) -> object:
        if name == "progress" and not refused:
            refused.append(name)
            raise redis_errors.OutOfMemoryError(
                "command not allowed when used memory > 'maxmemory'"
            )
        return await script(name, keys, args)  # type: ignore[arg-type]

    store._script = full_once  # type: ignore[method-assign]

    async def scenario() -> _Running:
        task: asyncio.Task[Outcome] = asyncio.create_task(asyncio.Event().wait())  # type: ignore[arg-type]
        run = _Running(job, "0-0", task)
        await asyncio.wait_for(store._follow(run), 10)
        await asyncio.gather(task, return_exceptions=True)
        return run

    run = client.portal.call(scenario)  # type: ignore[union-attr]
    assert refused and run.stopped == "cancelled" and run.task.cancelled()


def test_a_key_of_another_type_is_a_503_that_says_so_not_a_500(
    replicas: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    """Another program that writes the service's keys (a string where a job's hash or the
    active jobs' hash should be) makes Redis answer WRONGTYPE: the routes answer 503 with a
    message that names the problem, and the stream ends, instead of a 500."""
    client = replicas()
    redis = redis_server.client(db_of(client))
    redis.set("camserve:job:foreign", "not a hash")
    for response in (client.get("/jobs/foreign"), client.delete("/jobs/foreign")):
        assert "wrong type" in assert_error(response, 503, "job_store_unavailable")
    assert "wrong type" in assert_error(
        client.get("/jobs/foreign/events"), 503, "job_store_unavailable"
    )
    redis.set("camserve:jobs:active", "not a hash")
    response = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"})
    assert "wrong type" in assert_error(response, 503, "job_store_unavailable")
    assert client.get("/ready").json()["job_store"]["available"] is True
    redis.delete("camserve:jobs:active")
    job = submit(client, method="GradCAM")
    assert wait_for(client, job["id"], finished)["status"] == "succeeded"


def test_an_event_stream_resumed_past_its_end_still_gets_the_final_event(
    replicas: Callable[..., TestClient],
) -> None:
    """A Last-Event-ID past the newest entry of the job's stream (a client's id from another
    stream, or Redis restored from an older snapshot) once kept the stream open with keep-alives
    until the job expired, after the job ended; the memory store sends the final event."""
    client = replicas()
    store = store_of(client)
    job_id = queue_without_running(client)

    async def follow() -> list[JobEvent | None]:
        seen: list[JobEvent | None] = []
        async for event in store.events(job_id, "99999999999999-0", 0.05):
            seen.append(event)
            if event is None and len(seen) == 1:
                await store.cancel(job_id)
            if len(seen) > 20:
                break
        return seen

    seen = client.portal.call(follow)  # type: ignore[union-attr]
    assert seen[0] is None  # a keep-alive while it is queued
    last = seen[-1]
    assert last is not None and last.name == "cancelled" and len(seen) <= 3, seen


def test_results_too_large_to_keep_are_refused_at_creation(
    replicas: Callable[..., TestClient],
) -> None:
    client = replicas(job_max_result_bytes=4096)
    response = client.post(
        "/jobs",
        files=files(image_bytes(size=(400, 300))),
        data={"output": "overlay,heatmap", "image_format": "png"},
    )
    message = assert_error(response, 413, "result_too_large")
    assert "CAMSERVE_JOB_MAX_RESULT_BYTES" in message
    body = response.json()["error"]["details"]
    assert body["estimate_bytes"] > body["limit_bytes"] == 4096
    # Small enough: accepted.
    assert client.post("/jobs", files=files(image_bytes()), data={"output": "raw"}).status_code


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_down_fails_jobs_fast_but_not_explain_and_comes_back(
    make_client: Callable[..., TestClient], own_server: RedisServer
) -> None:
    client = make_client(job_store=own_server.url())
    job = submit(client, method="GradCAM")
    wait_for(client, job["id"], finished)
    own_server.stop()
    response = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"})
    message = assert_error(response, 503, "job_store_unavailable")
    assert "POST /explain still works" in message and response.headers["retry-after"] == "5"
    assert_error(client.get(f"/jobs/{job['id']}"), 503, "job_store_unavailable")
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["job_store"]["available"] is False
    assert client.post("/explain", files=files(image_bytes())).status_code == 200
    own_server.start()  # empty: its jobs are gone, the queue is made again
    until(lambda: client.get("/ready").json()["job_store"]["available"], timeout=20)
    again = submit(client, method="GradCAM")
    assert wait_for(client, again["id"], finished)["status"] == "succeeded"


def test_a_full_redis_refuses_new_jobs_with_503_and_still_answers_reads(
    make_client: Callable[..., TestClient], own_server: RedisServer
) -> None:
    """Past its maxmemory (with noeviction, as the docs advise) Redis refuses writes: POST
    /jobs answers 503 with Retry-After, as the docs say, not a 500; reads still work, the store
    stays available, and jobs are taken again once Redis has room."""
    client = make_client(job_store=own_server.url())
    done = submit(client, method="GradCAM")
    wait_for(client, done["id"], finished)
    redis = own_server.client()
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", 1)
    try:
        response = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"})
        message = assert_error(response, 503, "job_store_unavailable")
        assert "full" in message and "maxmemory" in message
        assert response.headers["retry-after"] == "5"
        assert client.get(f"/jobs/{done['id']}").json()["status"] == "succeeded"
        assert client.get("/ready").json()["job_store"]["available"] is True
        assert redis.hlen("camserve:jobs:active") == 0  # the refused job holds no place
    finally:
        redis.config_set("maxmemory", 0)
    again = submit(client, method="GradCAM")
    assert wait_for(client, again["id"], finished)["status"] == "succeeded"


def test_a_password_outside_the_url_is_used(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        client = make_client(job_store=server.url(), job_store_password="s3cret")
        job = submit(client, method="GradCAM")
        assert wait_for(client, job["id"], finished)["status"] == "succeeded"
        # A wrong one stops startup: test_redis_refusal.py.
    finally:
        server.stop()


def test_a_full_connection_pool_is_not_redis_down(replicas: Callable[..., TestClient]) -> None:
    """The pools are sized above the event streams a replica keeps; a full pool all the same
    answers that one request 503 overloaded, and the store stays available to everyone."""
    client = replicas(max_event_streams=3)
    store = store_of(client)
    for pool in (store._redis.connection_pool, store._blocking.connection_pool):
        assert pool.max_connections > 3 + store.workers
    job = submit(client, method="GradCAM")
    wait_for(client, job["id"], finished)
    pool = store._redis.connection_pool
    held = []
    while True:  # take every connection the pool may open
        try:
            held.append(pool.get_available_connection())
        except redis_errors.MaxConnectionsError:
            break
    try:
        response = client.get(f"/jobs/{job['id']}")
        assert "every connection" in assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
        assert store.state().available
        assert client.get("/ready").json()["job_store"]["available"] is True
    finally:
        for connection in held:
            client.portal.call(pool.release, connection)  # type: ignore[union-attr]
    assert client.get(f"/jobs/{job['id']}").status_code == 200


def test_rediss_runs_jobs_over_tls_and_refuses_an_unknown_authority(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, tls=True)
    server.start()
    try:
        assert server.url().startswith("rediss://")
        client = make_client(job_store=server.url())
        assert client.get("/ready").json()["job_store"] == {
            "backend": "redis",
            "available": True,
            "problem": None,
        }
        job = submit(client, method="GradCAM")
        assert wait_for(client, job["id"], finished)["status"] == "succeeded"
        assert server.client().exists(f"camserve:job:{job['id']}")  # it went through TLS
        # Without the CA, the server's certificate is not trusted: the store is unavailable.
        untrusted = make_client(job_store=f"rediss://127.0.0.1:{server.port}/0")
        assert untrusted.get("/ready").json()["job_store"]["available"] is False
        # Plain text to the TLS port is no store either.
        plain = make_client(job_store=f"redis://127.0.0.1:{server.port}/0")
        assert plain.get("/ready").json()["job_store"]["available"] is False
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_a_job_runs_as_the_client_that_created_it(
    where: str,
    make_client: Callable[..., TestClient],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its passes count as its creator's (the turns fair among clients), also on a replica
    where no request of that client ever was (Redis: the worker's own task)."""
    if where == "redis":
        db = next(_databases)
        redis_server.client(db).flushdb()
        client = make_client(job_store=redis_server.url(db))
    else:
        client = make_client()
    explainer = client.app.state.explainer  # type: ignore[attr-defined]
    seen: list[str] = []
    explain = explainer.explain

    async def recording(*args: object, **kwargs: object) -> object:
        seen.append(current_caller())
        return await explain(*args, **kwargs)

    monkeypatch.setattr(explainer, "explain", recording)
    job = submit(client, method="GradCAM")
    assert wait_for(client, job["id"], finished)["status"] == "succeeded"
    assert seen == ["address:testclient"]
