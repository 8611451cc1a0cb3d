"""/jobs through HTTP: submit, follow, stream, cancel, expire, refuse."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from functools import partial

import pytest
from fastapi.testclient import TestClient

from app.pipeline import explainer as explainer_module
from app.pipeline.decoding import Upload
from app.pipeline.explainer import ExplainParams
from tests.conftest import assert_error, files, image_bytes

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


def test_events_stream_progress_then_the_final_job(client: TestClient) -> None:
    job = submit(client, method="SSCAM", num_samples="4", batch_size="4", seed="0")
    events = []
    with client.stream("GET", f"/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
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
    assert client.app.state.jobs.counts()["succeeded"] == 2  # type: ignore[attr-defined]


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
        if r.levelno >= logging.WARNING and r.name in ("app.pipeline.jobs", "app.http.errors")
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
    assert other.client == "other"
    wait_for(client, other.id, finished)
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
def test_shutdown_cut_cancels_running_jobs_with_that_reason(
    make_client: Callable[..., TestClient], route: str
) -> None:
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
    view = wait_for(client, job["id"], finished)
    assert view["status"] == "cancelled" and view["error"]["code"] == "shutting_down"


def test_a_queued_job_decodes_only_when_its_turn_comes(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real = explainer_module.decode_upload

    def counting(upload: Upload, *args: object, **kwargs: object) -> object:
        decoded.append(upload.filename)
        return real(upload, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(explainer_module, "decode_upload", counting)
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


def test_the_upload_bytes_jobs_keep_are_bounded(make_client: Callable[..., TestClient]) -> None:
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
