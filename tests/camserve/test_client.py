"""``camserve.client`` against a real server process, and its retries against a stub transport."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.http.schemas import ModelList
from app.pipeline.results import JobProgress
from app.settings import Settings
from camserve import (
    AsyncClient,
    Client,
    Explained,
    ExplainRequest,
    RetryPolicy,
    ServiceError,
    Unreachable,
)
from camserve.local import LocalService
from tests.camserve.conftest import API_KEY
from tests.fixtures_tasks import SHIPPED_STORE, shapes_scene
from tests.http.test_server import free_port

METHODS = ["GradCAM", "ScoreCAM"]


def explain_over_http(url: str, path: Path, **form: str | list[str]) -> dict:
    """What POST /explain answers, sent by hand."""
    response = httpx.post(
        f"{url}/explain",
        files=[("file", (path.name, path.read_bytes(), "image/png"))],
        data={"output": ["overlay", "raw"], "image_format": "png", **form},
        headers={"X-API-Key": API_KEY},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_as_endpoint(explained, answer: dict) -> None:  # type: ignore[no-untyped-def]
    (result,) = answer["results"]
    np.testing.assert_allclose(explained.result.logits, result["logits"], atol=1e-5)
    assert [p.class_idx for p in explained.predictions] == [
        p["class_idx"] for p in result["predictions"]
    ]
    for expected in result["explanations"]:
        maps = explained[expected["method"]]
        assert maps.class_idx == expected["class_idx"]
        raw = np.asarray(expected["maps"][-1]["raw"]["values"], dtype=np.float32)
        np.testing.assert_allclose(maps.raw, raw, atol=1e-5)
        assert maps.overlay is not None and maps.overlay.size == (
            expected["maps"][-1]["width"],
            expected["maps"][-1]["height"],
        )


def test_explain_gives_what_the_endpoint_gives(server: str, images: Path) -> None:
    path = images / "a.png"
    with Client(server, api_key=API_KEY) as client:
        explained = client.explain(path, methods=METHODS, image_format="png")
    assert_same_as_endpoint(explained, explain_over_http(server, path, method="GradCAM,ScoreCAM"))
    assert isinstance(explained.overlay, Image.Image)
    assert explained.raw is not None and explained.raw.dtype == np.float32
    assert explained.response.method == "GradCAM,ScoreCAM"


def test_explain_takes_a_path_bytes_a_pil_image_or_an_array(server: str, images: Path) -> None:
    path = images / "a.png"
    picture = Image.open(path).convert("RGB")
    inputs = [path, str(path), path.read_bytes(), picture, np.asarray(picture)]
    with Client(server, api_key=API_KEY) as client:
        answers = [client.explain(image, "GradCAM") for image in inputs]
    for answer in answers[1:]:
        np.testing.assert_allclose(answer.raw, answers[0].raw, atol=1e-5)
        np.testing.assert_allclose(answer.result.logits, answers[0].result.logits, atol=1e-5)
    with pytest.raises(TypeError, match="pass a path, bytes, a PIL image or a numpy array"):
        Client(server).explain(3.5)  # type: ignore[arg-type]


def test_options_reach_the_methods(server: str, images: Path) -> None:
    with Client(server, api_key=API_KEY) as client:
        explained = client.explain(images / "b.png", "SSCAM", num_samples=2, seed=3, top_k=2)
    assert explained.response.options == {"num_samples": 2, "seed": 3}
    assert len(explained.predictions) == 2


def test_models_and_predict(server: str, images: Path) -> None:
    with Client(server, api_key=API_KEY) as client:
        listing = client.models()
        detail = client.model("tiny")
        predicted = client.predict([images / "a.png", images / "b.png"], top_k=3)
    assert isinstance(listing, ModelList) and listing.default_model == "tiny"
    assert {m.name: m.status for m in listing.models}["broken"] == "failed"
    assert "GradCAM" in detail.methods and detail.target_layers == ["features"]
    assert [r.filename for r in predicted.results] == ["a.png", "b.png"]
    assert all(len(r.predictions) == 3 for r in predicted.results)


def test_a_job_reports_progress_and_gives_the_explanation(server: str, images: Path) -> None:
    path = images / "a.png"
    seen: list[JobProgress] = []
    with Client(server, api_key=API_KEY) as client:
        job = client.submit_job(path, "ScoreCAM", image_format="png", batch_size=1)
        explained = job.wait(progress=seen.append)
        assert job.status().status == "succeeded"
    assert seen and seen[-1].total == 4  # one masked forward per channel of the 4 of `features`
    assert_same_as_endpoint(explained, explain_over_http(server, path, method="ScoreCAM"))


def test_a_cancelled_job_raises_its_error(server: str, images: Path) -> None:
    with Client(server, api_key=API_KEY) as client:
        job = client.submit_job(
            images / "a.png", "SSCAM", model="resnet", num_samples=64, batch_size=1
        )
        assert job.cancel().status == "cancelled"
        with pytest.raises(ServiceError) as raised:
            job.wait()
    assert raised.value.code == "cancelled"


def test_async_client_gives_the_same_answers(server: str, images: Path) -> None:
    path = images / "b.png"

    async def run() -> tuple:  # type: ignore[type-arg]
        async with AsyncClient(server, api_key=API_KEY) as client:
            explained = await client.explain(path, METHODS, image_format="png")
            seen: list[JobProgress] = []
            job = await client.submit_job(path, "ScoreCAM", image_format="png")
            from_job = await job.wait(progress=seen.append)
            return explained, from_job, seen, await client.models()

    explained, from_job, seen, listing = asyncio.run(run())
    assert_same_as_endpoint(explained, explain_over_http(server, path, method="GradCAM,ScoreCAM"))
    np.testing.assert_allclose(from_job.raw, explained["ScoreCAM"].raw, atol=1e-5)
    assert seen and listing.default_model == "tiny"


def test_a_wrong_key_is_the_services_401_with_the_request_id(server: str) -> None:
    with Client(server, api_key="wrong", request_id="rid-1") as client:
        with pytest.raises(ServiceError) as raised:
            client.models()
    error = raised.value
    assert (error.status, error.code, error.request_id) == (401, "unauthorized", "rid-1")
    assert "X-API-Key" in error.message


def test_the_url_and_the_key_come_from_the_environment(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAMSERVE_URL", server)
    monkeypatch.setenv("CAMSERVE_API_KEY", API_KEY)
    with Client() as client:
        assert client.url == server
        assert client.models().default_model == "tiny"


# ------------------------------------------------------------------ retries (stub transport)

MODELS = {"default_model": "tiny", "models": []}
OVERLOADED = {"error": {"code": "overloaded", "message": "Too many requests are waiting."}}
FAST = RetryPolicy(attempts=3, backoff_s=0.0)


def stub(answers: list) -> tuple[httpx.MockTransport, list[httpx.Request]]:  # type: ignore[type-arg]
    """A transport that gives these answers in turn (an exception is raised)."""
    calls: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle), calls


def busy() -> httpx.Response:
    return httpx.Response(503, json=OVERLOADED, headers={"Retry-After": "0"})


def test_a_503_with_retry_after_is_retried() -> None:
    transport, calls = stub([busy(), busy(), httpx.Response(200, json=MODELS)])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        assert client.models().default_model == "tiny"
    assert len(calls) == 3


def test_a_503_that_persists_ends_in_the_services_error() -> None:
    transport, calls = stub([busy()])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        with pytest.raises(ServiceError) as raised:
            client.explain(b"\x89PNG...", "GradCAM")
    assert (raised.value.status, raised.value.code) == (503, "overloaded")
    assert len(calls) == FAST.attempts


def test_a_503_without_retry_after_is_not_retried() -> None:
    failed = {"error": {"code": "model_unavailable", "message": "Model 'x' failed to load."}}
    transport, calls = stub([httpx.Response(503, json=failed)])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        with pytest.raises(ServiceError, match="model_unavailable"):
            client.models()
    assert len(calls) == 1


def test_a_reset_is_retried_for_idempotent_calls_only() -> None:
    reset = httpx.ReadError("connection reset by peer")
    transport, calls = stub([reset, httpx.Response(200, json=MODELS)])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        assert client.models().default_model == "tiny"
    assert len(calls) == 2
    transport, calls = stub([reset, httpx.Response(200, json=MODELS)])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        with pytest.raises(Unreachable, match="connection reset"):
            client.explain(b"png", "GradCAM")  # a POST may have been half done: not resent
    assert [c.method for c in calls] == ["POST", "GET"]  # the GET asks why it broke


def test_an_answer_that_is_not_http_names_the_grpc_port() -> None:
    # What httpx raises when the URL names camserve's gRPC port (8001) instead of its HTTP one
    transport, _ = stub([httpx.RemoteProtocolError("illegal request line")])
    with Client("http://camserve:8001", retry=FAST, transport=transport) as client:
        with pytest.raises(Unreachable, match="illegal request line") as raised:
            client.models()
    assert "a gRPC port?" in raised.value.message and "CAMSERVE_PORT" in raised.value.message
    # an upload there breaks with a reset; the GET that asks why gets the answer that says it
    not_http = httpx.RemoteProtocolError("illegal request line")
    transport, _ = stub([httpx.ReadError("reset"), not_http])
    with Client("http://camserve:8001", retry=FAST, transport=transport) as client:
        with pytest.raises(Unreachable, match="a gRPC port"):
            client.explain(b"png", "GradCAM")
    gone = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    transport, _ = stub([gone])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        with pytest.raises(Unreachable) as raised:
            client.models()
    assert "gRPC" not in raised.value.message  # a dropped connection is no mix-up of ports


def test_a_refusal_lost_in_a_reset_upload_is_still_reported() -> None:
    # The service answers 401 on the headers and closes without reading the body: the client,
    # still uploading, may see a reset instead. It asks once more with a GET, which gets the 401.
    refused = {"error": {"code": "unauthorized", "message": "Missing or wrong API key."}}
    transport, calls = stub([httpx.ReadError("reset"), httpx.Response(401, json=refused)])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        with pytest.raises(ServiceError) as raised:
            client.explain(b"png", "GradCAM")
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    assert [c.method for c in calls] == ["POST", "GET"]


def test_the_wait_is_bounded_and_follows_retry_after() -> None:
    policy = RetryPolicy(attempts=5, backoff_s=0.5, max_wait_s=4.0)
    assert [policy.wait_s(n) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.wait_s(0, "3") == 3.0
    assert policy.wait_s(0, "600") == 4.0
    assert policy.wait_s(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 2.0


def test_a_url_without_a_scheme_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match=r"http:// or https://.*e\.g\. http://localhost:1"):
            make("localhost:1")
    monkeypatch.setenv("CAMSERVE_URL", "ftp://camserve")
    with pytest.raises(ValueError, match="CAMSERVE_URL 'ftp://camserve'"):
        Client()
    assert Client("HTTPS://camserve:8000/").url == "HTTPS://camserve:8000"


def test_a_404_that_camserve_did_not_write_says_the_url_is_not_its_root() -> None:
    foreign = httpx.Response(404, json={"error": "No route /v2/models; see /docs for the API."})
    transport, _ = stub([foreign])
    with Client("http://camserve:8000/v2", retry=FAST, transport=transport) as client:
        with pytest.raises(ServiceError) as raised:
            client.models()
    error = raised.value
    assert (error.status, error.code) == (404, "not_camserve")
    assert "http://camserve:8000/v2 does not look like the root" in error.message
    assert "e.g. http://camserve:8000" in error.message and "No route" in error.message
    assert "Client(url)" in error.message  # the way a Python caller sets it, beside --url
    missing = {"error": {"code": "model_not_found", "message": "No model 'x'."}}
    transport, _ = stub([httpx.Response(404, json=missing)])
    with Client("http://camserve:8000", retry=FAST, transport=transport) as client:
        with pytest.raises(ServiceError, match="model_not_found"):
            client.model("x")  # camserve's own 404 stays what it is


def test_names_and_ids_stay_one_segment_of_the_path() -> None:
    transport, calls = stub([httpx.Response(404, json={"error": {"code": "x", "message": "x"}})])
    with Client("http://camserve/api", retry=FAST, transport=transport) as client:
        for call in (
            lambda: client.model("../etc"),
            lambda: client.model(".."),
            lambda: client.job("a/b?c#d").status(),
            lambda: client.job("..").cancel(),
            lambda: client.job("../x").wait(),
        ):
            with pytest.raises(ServiceError):
                call()
    assert [c.url.raw_path.decode() for c in calls] == [
        "/api/models/..%2Fetc",
        "/api/models/%2E%2E",
        "/api/jobs/a%2Fb%3Fc%23d",
        "/api/jobs/%2E%2E",
        "/api/jobs/..%2Fx/events",
    ]


def test_no_server_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retry=RetryPolicy(attempts=2, backoff_s=0.0)) as client:
        with pytest.raises(Unreachable) as raised:
            client.models()
    assert raised.value.code == "unreachable" and url in raised.value.message
    assert "Client(url)" in raised.value.message


# ------------------------------------------------------------------ progress (stub event stream)


def job_stream() -> httpx.Response:
    """What /jobs/{id}/events sends for a job queued, then running its 64 masked forwards in
    chunks of 32, then failing: the count repeats when only the status changes, and the final
    event repeats the last count."""

    def event(name: str, data: dict) -> str:  # type: ignore[type-arg]
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    counts = [("queued", 0, 0), ("running", 0, 0), ("running", 0, 64), ("running", 32, 64)]
    counts += [("running", 64, 64)]
    body = "".join(
        event("progress", {"status": s, "progress": {"done": d, "total": t}}) for s, d, t in counts
    )
    final = {
        "id": "j1", "status": "failed", "url": "/jobs/j1", "created": "2026-01-01T00:00:00Z",
        "progress": {"done": 64, "total": 64},
        "error": {"code": "internal_error", "message": "the model broke"},
    }  # fmt: skip
    body += event("failed", final)
    return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})


def test_the_progress_callback_hears_each_count_once() -> None:
    seen: list[JobProgress] = []
    transport, _ = stub([job_stream()])
    with Client("http://camserve", retry=FAST, transport=transport) as client:
        with pytest.raises(ServiceError, match="the model broke"):
            client.job("j1").wait(progress=seen.append)
    assert [(p.done, p.total) for p in seen] == [(0, 0), (0, 64), (32, 64), (64, 64)]


def test_the_async_progress_callback_hears_each_count_once() -> None:
    seen: list[JobProgress] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        return job_stream()

    async def run() -> None:
        transport = httpx.MockTransport(handle)
        async with AsyncClient("http://camserve", retry=FAST, transport=transport) as client:
            with pytest.raises(ServiceError, match="the model broke"):
                await client.job("j1").wait(progress=seen.append)

    asyncio.run(run())
    assert [(p.done, p.total) for p in seen] == [(0, 0), (0, 64), (32, 64), (64, 64)]


def refused_stream(status: int, code: str, retry_after: str | None = "0") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": code, "message": f"{code} refused the stream."}}
    return httpx.Response(status, json=body, headers=headers)


STORE_DOWN = (503, "job_store_unavailable")
TOO_MANY = (429, "too_many_streams")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_wait_asks_again_after_a_refusal_with_retry_after(asynchronous: bool) -> None:
    answers = [refused_stream(*STORE_DOWN), refused_stream(*TOO_MANY), job_stream()]
    seen, calls = wait_on_stub(answers, asynchronous, match="the model broke")
    assert len(calls) == 3 and {c.url.path for c in calls} == {"/jobs/j1/events"}
    assert seen[-1] == (64, 64)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_wait_gives_up_on_a_refusal_that_persists_or_names_no_wait(asynchronous: bool) -> None:
    _, calls = wait_on_stub([refused_stream(*STORE_DOWN)], asynchronous, "job_store_unavailable")
    assert len(calls) == FAST.attempts
    no_wait = refused_stream(*STORE_DOWN, retry_after=None)
    _, calls = wait_on_stub([no_wait], asynchronous, "job_store_unavailable")
    assert len(calls) == 1


def wait_on_stub(
    answers: list,
    asynchronous: bool,
    match: str,  # type: ignore[type-arg]
) -> tuple[list[tuple[int, int]], list[httpx.Request]]:
    """``Job("j1").wait()`` through a stub transport that gives ``answers`` in turn: the counts
    the progress callback heard and the requests sent; it must raise ``ServiceError(match)``."""
    seen: list[tuple[int, int]] = []
    transport, calls = stub(answers)

    def heard(progress: JobProgress) -> None:
        seen.append((progress.done, progress.total))

    async def handle(request: httpx.Request) -> httpx.Response:
        return transport.handle_request(request)

    async def run_async() -> None:
        mock = httpx.MockTransport(handle)
        async with AsyncClient("http://camserve", retry=FAST, transport=mock) as client:
            await client.job("j1").wait(progress=heard)

    with pytest.raises(ServiceError, match=match):
        if asynchronous:
            asyncio.run(run_async())
        else:
            with Client("http://camserve", retry=FAST, transport=transport) as client:
                client.job("j1").wait(progress=heard)
    return seen, calls


def test_a_detectors_and_a_segmenters_answers_read_through_the_client() -> None:
    """``Explained.detections``/``segments`` and each explanation's ``detection``, ``box``,
    ``score`` and ``region``: the service's own answer (run in this process, the shipped
    store), read as the client reads it."""

    async def run() -> tuple[Explained, Explained]:
        settings = Settings(model_store=SHIPPED_STORE, device="cpu", cache_mb=0)
        async with LocalService(settings) as local:
            boxes = await local.explain(
                "s.png",
                shapes_scene(0),
                ExplainRequest(model="shapes-detect", fields={"box": "all"}),
            )
            classes = await local.explain(
                "s.png",
                shapes_scene(0),
                ExplainRequest(model="shapes-segment", fields={"top_classes": 2}),
            )
        return Explained(boxes), Explained(classes)

    detected, segmented = asyncio.run(run())
    assert detected.detections is not None and len(detected.detections) >= 2
    assert detected.segments is None and detected.predictions == []
    for k, maps in enumerate(detected.explanations):
        found = detected.detections[k]
        assert (maps.detection, maps.box, maps.score) == (k, found.box, found.score)
        assert maps.region is None and maps.raw is not None
    assert segmented.segments is not None and segmented.detections is None
    shapes = [s.class_idx for s in segmented.segments if s.class_idx != 0]
    assert [m.class_idx for m in segmented.explanations] == shapes[:2]
    assert all(m.region == "mask" and m.detection is None for m in segmented.explanations)
