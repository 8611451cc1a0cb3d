"""/jobs through HTTP: submit, follow, stream, cancel, expire, refuse."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

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
    job = submit(client, b"this is text, not a png")
    view = wait_for(client, job["id"], finished)
    assert view["status"] == "failed" and view["result"] is None
    assert view["error"]["code"] == "unsupported_media_type"


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


def test_the_store_keeps_at_most_max_jobs(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_jobs=1)
    first = submit(client, method="GradCAM")
    response = client.post("/jobs", files=files(image_bytes()), data={"method": "GradCAM"})
    assert_error(response, 503, "too_many_jobs")
    assert int(response.headers["retry-after"]) >= 1
    wait_for(client, first["id"], finished)
    client.delete(f"/jobs/{first['id']}")  # forgetting it makes room
    submit(client, method="GradCAM")


def test_finished_jobs_expire_after_the_ttl(make_client: Callable[..., TestClient]) -> None:
    client = make_client(job_ttl_s=0.2)
    job = submit(client, method="GradCAM")
    wait_for(client, job["id"], finished)
    time.sleep(0.3)
    assert_error(client.get(f"/jobs/{job['id']}"), 404, "job_not_found")


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
