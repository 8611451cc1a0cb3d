"""/jobs through HTTP: submit, follow, stream, cancel, expire, refuse.

The contract of every job store: each test runs on the in-memory store and on Redis (a real
redis-server; each app gets a database of its own, so that no other app's workers take its jobs).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from fastapi.testclient import TestClient

from app.http.app import create_app
from app.pipeline.decoding import Upload
from app.pipeline.explainer import ExplainParams
from app.pipeline.lanes import cpu as cpu_lane_module
from app.settings import Settings
from tests.conftest import assert_error, files, image_bytes, wait_ready
from tests.redis_server import RedisServer

_databases = itertools.cycle(range(1, 64))


@pytest.fixture(scope="module", params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_setting(backend: str, server: RedisServer) -> str:
    """The CAMSERVE_JOB_STORE of a new app: memory, or an emptied database of its own."""
    if backend == "memory":
        return "memory"
    db = next(_databases)
    server.client(db).flushdb()
    return server.url(db)


@pytest.fixture(scope="module")
def client(backend: str, settings: Settings, redis_server: RedisServer) -> Iterator[TestClient]:
    """One started service per backend, shared by the tests that do not change settings."""
    changed = Settings(
        **{**settings.model_dump(), "job_store": store_setting(backend, redis_server)}
    )
    with TestClient(create_app(changed)) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture
def make_client(
    backend: str, make_client: Callable[..., TestClient], redis_server: RedisServer
) -> Callable[..., TestClient]:
    """conftest's factory, on this module's backend."""

    def factory(**changes: object) -> TestClient:
        return make_client(**{"job_store": store_setting(backend, redis_server), **changes})

    return factory


#: ~2,000 masked forwards of resnet18 at 64x64: seconds of work, stopped early by the tests.
SLOW = {"model": "resnet", "method": "SSCAM", "num_samples": "8", "batch_size": "1", "seed": "0"}


def submit(client: TestClient, *images: bytes, **form: object) -> dict:
    response = client.post("/jobs", files=files(*(images or (image_bytes(),))), data=form)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == body["url"] == f"/jobs/{body['id']}"
    assert body["status"] == "queued"
    return body


def wait_for(client: TestClient, job_id: str, done: Callable[[dict], bool]) -> dict:
    deadline = time.monotonic() + 60
    while True:
        view = client.get(f"/jobs/{job_id}").json()
        if done(view):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.02)


def finished(view: dict) -> bool:
    return view["status"] in ("succeeded", "failed", "cancelled")


def test_a_job_answers_exactly_what_explain_answers(client: TestClient) -> None:
    form = {"method": "ScoreCAM", "batch_size": "8", "output": "overlay,raw", "class_idx": "1"}
    job = submit(client, image_bytes(seed=3), **form)
    view = wait_for(client, job["id"], finished)
    assert view["status"] == "succeeded", view
    direct = client.post("/explain", files=files(image_bytes(seed=3)), data=form).json()
    result = view["result"]
    for body in (result, direct):
        body.pop("timings")
    assert result == direct
    assert view["error"] is None
    assert view["created"] <= view["started"] <= view["finished"]
    progress = view["progress"]
    assert progress["total"] > 0 and progress["done"] == progress["total"]


def test_job_ids_are_unguessable_and_unknown_ones_are_404(client: TestClient) -> None:
    ids = {submit(client, method="GradCAM")["id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) >= 22 for i in ids)
    message = assert_error(client.get("/jobs/" + "x" * 5000), 404, "job_not_found")
    assert len(message) < 400  # the id is not echoed back whole
    assert_error(client.delete("/jobs/nope"), 404, "job_not_found")
    assert_error(client.get("/jobs/nope/events"), 404, "job_not_found")


def test_bad_parameters_are_refused_when_the_job_is_created(client: TestClient) -> None:
    response = client.post("/jobs", files=files(image_bytes()), data={"method": "NoSuchCAM"})
    assert_error(response, 422, "unsupported_method")
    response = client.post("/jobs", files=files(image_bytes()), data={"model": "nope"})
    assert_error(response, 404, "model_not_found")


def test_an_undecodable_upload_fails_the_job_with_the_usual_error(client: TestClient) -> None:
    # What the header tells is refused when the job is created ...
    response = client.post("/jobs", files=files(b"this is text, not a png"))
    assert_error(response, 415, "unsupported_media_type")
    # ... damage past the header when the job decodes.
    job = submit(client, image_bytes((64, 64))[:200])
    view = wait_for(client, job["id"], finished)
    assert view["status"] == "failed" and view["result"] is None
    assert view["error"]["code"] == "invalid_image"


def test_delete_stops_a_running_job_within_a_chunk(client: TestClient) -> None:
    job = submit(client, **SLOW)
    running = wait_for(client, job["id"], lambda v: v["progress"]["done"] > 0)
    assert running["status"] == "running" and running["started"]
    assert running["progress"]["total"] == 256 * 8  # layer3 channels x noise draws
    cancelled = client.delete(f"/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["error"]["code"] == "cancelled"
    # The model is free again at once: the pass stopped at its next chunk.
    quick = client.post("/explain", files=files(image_bytes()), data={"model": "resnet"})
    assert quick.status_code == 200
    later = client.get(f"/jobs/{job['id']}").json()
    assert later["status"] == "cancelled" and later["progress"]["done"] < 256 * 8
    # Deleting a finished job forgets it.
    assert client.delete(f"/jobs/{job['id']}").status_code == 200
    assert_error(client.get(f"/jobs/{job['id']}"), 404, "job_not_found")


def test_head_of_a_running_jobs_event_stream_ends_with_its_headers(client: TestClient) -> None:
    job = submit(client, **SLOW)
    wait_for(client, job["id"], lambda v: v["status"] == "running")
    head = client.head(f"/jobs/{job['id']}/events")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")
    # The stream ended with its headers, not with the job: the job is still running.
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "running"
    assert client.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"


def test_explain_on_the_model_of_a_running_job_answers_between_its_chunks(
    client: TestClient,
) -> None:
    image = image_bytes(seed=7)
    form = {"model": "resnet", "method": "GradCAM", "output": "raw", "class_idx": "1"}
    alone = client.post("/explain", files=files(image), data=form).json()
    job = submit(client, **SLOW)
    wait_for(client, job["id"], lambda v: v["progress"]["done"] > 0)
    beside = client.post("/explain", files=files(image), data=form)
    assert beside.status_code == 200, beside.text
    # Answered while the job still runs (it would need seconds more), with the same map.
    view = client.get(f"/jobs/{job['id']}").json()
    assert view["status"] == "running" and view["progress"]["done"] < 256 * 8
    got, want = (
        b["results"][0]["explanations"][0]["maps"][0]["raw"] for b in (beside.json(), alone)
    )
    assert got["shape"] == want["shape"]
    flat = [v for row in got["values"] for v in row]
    assert flat == pytest.approx([v for row in want["values"] for v in row], abs=1e-5)
    client.delete(f"/jobs/{job['id']}")
    metrics = client.get("/metrics").text
    yields = [
        line for line in metrics.splitlines() if line.startswith("camserve_pass_yields_total")
    ]
    assert any('model="resnet"' in line and float(line.split()[-1]) >= 1 for line in yields)
    assert 'camserve_queue_wait_seconds_count{model="resnet",priority="interactive"}' in metrics


def read_events(
    client: TestClient,
    job_id: str,
    last_event_id: str | None = None,
    stop_after: int = 0,
    key: str | None = None,
) -> list[tuple[str, str, dict]]:
    """(id, name, data) of the job's events, all of them or the first ``stop_after``."""
    events: list[tuple[str, str, dict]] = []
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    if key is not None:
        headers["X-API-Key"] = key
    with client.stream("GET", f"/jobs/{job_id}/events", headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        event_id = name = ""
        for line in stream.iter_lines():
            if line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event_id, name, json.loads(line.removeprefix("data: "))))
                if len(events) == stop_after:
                    break
    return events


def test_events_stream_progress_then_the_final_job(client: TestClient) -> None:
    job = submit(client, method="SSCAM", num_samples="4", batch_size="4", seed="0")
    events = [(name, data) for _, name, data in read_events(client, job["id"])]
    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and set(names[:-1]) <= {"progress"}
    final = events[-1][1]
    assert final["result"]["method"] == "SSCAM"
    done = [data["progress"]["done"] for name, data in events if name == "progress"]
    assert done == sorted(done)


def test_finished_jobs_never_block_a_new_one(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_jobs=2)
    ids = []
    for _ in range(4):  # the fourth and fifth evict the oldest finished ones
        ids.append(submit(client, method="GradCAM")["id"])
        wait_for(client, ids[-1], finished)
    assert [client.get(f"/jobs/{i}").status_code for i in ids] == [404, 404, 200, 200]
    store = client.app.state.jobs  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10  # Redis' counts are refreshed every 2 s
    while store.counts()["succeeded"] != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.counts()["succeeded"] == 2


def test_unfinished_jobs_are_bounded_with_an_honest_retry_after(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(max_jobs=1, job_ttl_s=3600)
    job = submit(client, **SLOW)
    wait_for(client, job["id"], lambda v: v["progress"]["done"] > 0)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            response = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"})
            message = assert_error(response, 503, "too_many_jobs")
    assert "queued or running" in message
    eta = client.get(f"/jobs/{job['id']}").json()["progress"]["eta_s"]
    assert 1 <= int(response.headers["retry-after"]) <= max(1, eta) + 5  # not the TTL
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and (r.name.startswith("app.pipeline.jobs") or r.name == "app.http.errors")
    ]
    assert len(warnings) == 1 and "refusing jobs" in warnings[0].getMessage()
    client.delete(f"/jobs/{job['id']}")
    submit(client, method="GradCAM")


def test_one_client_cannot_take_every_place(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_jobs=8, max_jobs_per_client=1)
    job = submit(client, **SLOW)
    response = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"})
    assert "CAMSERVE_MAX_JOBS_PER_CLIENT" in assert_error(response, 503, "too_many_jobs")
    # Another client still gets in.
    store = client.app.state.jobs  # type: ignore[attr-defined]
    upload = Upload("a.png", image_bytes())
    other = client.portal.call(  # type: ignore[union-attr]
        partial(store.create, None, [upload], ExplainParams(method="GradCAM"), client="other")
    )
    assert other.status == "queued"
    assert wait_for(client, other.id, finished)["status"] == "succeeded"
    client.delete(f"/jobs/{job['id']}")


def test_jobs_need_the_api_key_like_every_model_route(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_key="secret")
    assert_error(client.post("/jobs", files=files(image_bytes())), 401, "unauthorized")
    assert_error(client.get("/jobs/anything"), 401, "unauthorized")
    response = client.post("/jobs", files=files(image_bytes()), headers={"X-API-Key": "secret"})
    assert response.status_code == 202
    assert (
        client.get(response.headers["location"], headers={"X-API-Key": "secret"}).status_code == 200
    )


@pytest.mark.parametrize("route", ["/explain", "/jobs"])
def test_shutdown_cut_stops_running_jobs_without_dropping_them(
    make_client: Callable[..., TestClient], route: str, backend: str
) -> None:
    """In memory a cut job is cancelled with that reason; with Redis it goes back to the queue
    for another replica (this one takes nothing new while it drains)."""
    client = make_client()
    job = submit(client, **SLOW)
    wait_for(client, job["id"], lambda v: v["progress"]["done"] > 0)
    lifecycle = client.app.state.lifecycle  # type: ignore[attr-defined]
    lifecycle.grace_s = 0.0
    lifecycle.begin_drain()
    # New work is refused on its headers; following a job still works.
    assert_error(client.post(route, files=files(image_bytes())), 503, "shutting_down")
    assert client.get("/ready").status_code == 503
    client.portal.call(lambda: lifecycle.ready_to_exit())  # type: ignore[union-attr]
    if backend == "memory":
        view = wait_for(client, job["id"], finished)
        assert view["status"] == "cancelled" and view["error"]["code"] == "shutting_down"
    else:
        view = wait_for(client, job["id"], lambda v: v["status"] == "queued")
        assert view["started"] is None and view["progress"]["done"] == 0


def test_a_queued_job_decodes_only_when_its_turn_comes(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real = cpu_lane_module.decode_upload

    def counting(upload: Upload, *args: object, **kwargs: object) -> object:
        decoded.append(upload.filename)
        return real(upload, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_lane_module, "decode_upload", counting)
    client = make_client(max_model_slots=1)
    first = submit(client, **SLOW)
    wait_for(client, first["id"], lambda v: v["progress"]["done"] > 0)
    response = client.post("/jobs", files=[("file", ("late.png", image_bytes(), "image/png"))])
    second = response.json()
    time.sleep(0.3)
    assert client.get(f"/jobs/{second['id']}").json()["status"] == "queued"
    assert "late.png" not in decoded  # only its bytes are kept while it waits
    client.delete(f"/jobs/{first['id']}")
    assert wait_for(client, second["id"], finished)["status"] == "succeeded"
    assert "late.png" in decoded


def test_the_upload_bytes_jobs_keep_are_bounded(
    make_client: Callable[..., TestClient], backend: str
) -> None:
    if backend == "redis":
        pytest.skip("with Redis, queued jobs keep their uploads in Redis, not in this process")
    client = make_client(job_upload_budget_bytes=1024**2)
    heavy = image_bytes((420, 420))  # ~530 KB of random pixels
    assert 500_000 < len(heavy) < 1024**2 // 2 + 100_000
    first = submit(client, heavy, **SLOW)
    response = client.post("/jobs", files=files(heavy), data={"method": "GradCAM"})
    assert "CAMSERVE_JOB_UPLOAD_BUDGET_BYTES" in assert_error(response, 503, "too_many_jobs")
    response = client.post("/jobs", files=files(heavy, heavy, heavy))
    assert_error(response, 413, "payload_too_large")
    client.delete(f"/jobs/{first['id']}")


def test_a_wrong_method_names_every_method_of_the_path(client: TestClient) -> None:
    response = client.request("OPTIONS", "/jobs/some-id")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET"
    assert "use DELETE, GET" in response.json()["error"]["message"]


def test_events_resume_after_the_last_event_id(client: TestClient) -> None:
    job = submit(client, method="SSCAM", num_samples="8", batch_size="2", seed="0")
    first = read_events(client, job["id"], stop_after=2)
    seen_id, _, seen = first[-1]
    rest = read_events(client, job["id"], last_event_id=seen_id)
    assert rest[-1][1] == "succeeded"
    assert seen_id not in [event_id for event_id, _, _ in rest]
    done = [data["progress"]["done"] for _, name, data in rest if name == "progress"]
    assert all(d >= seen["progress"]["done"] for d in done)
    # A finished job's stream is its final event only, whatever the client saw before.
    assert [name for _, name, _ in read_events(client, job["id"])] == ["succeeded"]
    again = read_events(client, job["id"], last_event_id=rest[-1][0])
    assert [name for _, name, _ in again] == ["succeeded"]


def test_a_queued_job_cancelled_never_runs(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_model_slots=1)
    slow = submit(client, **SLOW)
    wait_for(client, slow["id"], lambda v: v["progress"]["done"] > 0)
    queued = submit(client, method="GradCAM")
    cancelled = client.delete(f"/jobs/{queued['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["started"] is None
    client.delete(f"/jobs/{slow['id']}")
    submit_after = submit(client, method="GradCAM")  # the slot is free again
    assert wait_for(client, submit_after["id"], finished)["status"] == "succeeded"
    view = client.get(f"/jobs/{queued['id']}").json()
    assert view["status"] == "cancelled" and view["started"] is None and view["result"] is None


def test_ready_names_the_job_store_in_use(client: TestClient, backend: str) -> None:
    body = client.get("/ready").json()
    assert body["ready"] is True
    assert body["job_store"] == {"backend": backend, "available": True, "problem": None}


def keyed(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def test_a_job_is_visible_only_to_the_key_that_made_it(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_keys="alice:a-key,bob:b-key")
    response = client.post("/jobs", files=files(image_bytes()), headers=keyed("a-key"))
    assert response.status_code == 202
    url = response.headers["location"]
    for method, path in [("GET", url), ("DELETE", url), ("GET", url + "/events")]:
        assert_error(client.request(method, path, headers=keyed("b-key")), 404, "job_not_found")
    assert wait_for_key(client, url, "a-key")["status"] == "succeeded"
    assert [n for _, n, _ in read_events(client, url.rsplit("/", 1)[1], key="a-key")] == [
        "succeeded"
    ]
    assert client.delete(url, headers=keyed("a-key")).status_code == 200


def wait_for_key(client: TestClient, url: str, key: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        view = client.get(url, headers=keyed(key)).json()
        if finished(view):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.02)


def test_a_jobs_cached_explanations_are_its_keys(make_client: Callable[..., TestClient]) -> None:
    # Jobs kept their answers in one scope for every key: bob's job of alice's image was a hit,
    # done at once, telling bob that another client had sent that very image; and a key's job
    # never filled the cache for that key's own /explain.
    client = make_client(cache_mb=8, api_keys="alice:a-key,bob:b-key")
    image = image_bytes(seed=41)

    def job_cache(key: str) -> str:
        response = client.post("/jobs", files=files(image), headers=keyed(key))
        assert response.status_code == 202, response.text
        view = wait_for_key(client, response.headers["location"], key)
        assert view["status"] == "succeeded", view
        return view["result"]["timings"]["cache"]

    assert [job_cache("a-key"), job_cache("b-key"), job_cache("a-key")] == ["miss", "miss", "hit"]
    explained = client.post("/explain", files=files(image), headers=keyed("a-key"))
    assert explained.headers["x-camserve-cache"] == "hit"


def test_each_key_has_its_own_job_cap(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="alice:a-key,bob:b-key", max_jobs_per_client=1)
    first = client.post("/jobs", files=files(image_bytes()), data=SLOW, headers=keyed("a-key"))
    assert first.status_code == 202
    again = client.post("/jobs", files=files(image_bytes()), data=SLOW, headers=keyed("a-key"))
    assert "CAMSERVE_MAX_JOBS_PER_CLIENT" in assert_error(again, 503, "too_many_jobs")
    other = client.post("/jobs", files=files(image_bytes()), headers=keyed("b-key"))
    assert other.status_code == 202  # another key, another client
    client.delete(first.headers["location"], headers=keyed("a-key"))
    client.delete(other.headers["location"], headers=keyed("b-key"))


async def _never_ends(*args: object, **kwargs: object) -> None:
    """A job's work that runs until it is cancelled: its event stream stays open."""
    await asyncio.Event().wait()


def test_event_streams_are_bounded_per_client_and_per_replica(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The jobs never end while the test holds their streams (a job that ended would close its
    # stream and give its place back: on a loaded machine that made this test flaky).
    for store in ("memory", "redis_store"):
        monkeypatch.setattr(f"app.pipeline.jobs.{store}.run_job", _never_ends)
    client = make_client(
        api_keys="alice:a-key,bob:b-key,carol:c-key",
        max_event_streams=2,
        max_event_streams_per_client=1,
        max_model_slots=1,
    )
    urls = {}
    for key in ("a-key", "b-key", "c-key"):
        response = client.post("/jobs", files=files(image_bytes()), data=SLOW, headers=keyed(key))
        urls[key] = response.headers["location"]
    streams = client.app.state.streams  # type: ignore[attr-defined]
    with client.stream("GET", urls["a-key"] + "/events", headers=keyed("a-key")) as held:
        assert held.status_code == 200
        mine = client.get(urls["a-key"] + "/events", headers=keyed("a-key"))
        message = assert_error(mine, 429, "too_many_streams")
        assert "CAMSERVE_MAX_EVENT_STREAMS_PER_CLIENT" in message
        assert mine.headers["retry-after"] == "5"
        with client.stream("GET", urls["b-key"] + "/events", headers=keyed("b-key")) as second:
            assert second.status_code == 200
            full = client.get(urls["c-key"] + "/events", headers=keyed("c-key"))
            assert "CAMSERVE_MAX_EVENT_STREAMS)" in assert_error(full, 429, "too_many_streams")
        assert streams.open == 2
    for key, url in urls.items():
        client.delete(url, headers=keyed(key))
    # (TestClient does not tell the app that a stream was closed early; a real server does:
    # tests/http/test_server.py checks that a closed stream gives its place back.)


@pytest.mark.parametrize("sent", [b"\xb2", "99999999999999999999-0", "18446744073709551616-1"])
def test_a_bad_last_event_id_gets_400_before_the_stream(client: TestClient, sent: object) -> None:
    job = submit(client, method="GradCAM")
    response = client.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": sent})
    assert "Last-Event-ID" in assert_error(response, 400, "bad_request")


def test_repeated_deletes_answer_alike_on_every_store(client: TestClient) -> None:
    """DELETE cancels an unfinished job and answers its final state; a DELETE of a finished job
    answers that state and forgets it; after that, 404."""
    running = submit(client, **SLOW)
    wait_for(client, running["id"], lambda v: v["status"] == "running")
    first = client.delete(f"/jobs/{running['id']}")
    second = client.delete(f"/jobs/{running['id']}")
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == second.json()["status"] == "cancelled"
    assert first.json()["error"] == second.json()["error"]
    assert first.json()["finished"] == second.json()["finished"]
    assert_error(client.delete(f"/jobs/{running['id']}"), 404, "job_not_found")
    done = submit(client, method="GradCAM")
    view = wait_for(client, done["id"], finished)
    deleted = client.delete(f"/jobs/{done['id']}")
    assert deleted.status_code == 200 and deleted.json() == view
    assert_error(client.delete(f"/jobs/{done['id']}"), 404, "job_not_found")
