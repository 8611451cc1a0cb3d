"""Limits of the explain stages through every protocol (form, KServe, OIP, /jobs): the render
budget, layers without a 2x2 map, and the forward budget summed over KServe's instances."""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.cam import METHODS
from app.http.app import create_app
from app.settings import Settings
from tests.conftest import assert_error, files, image_bytes, wait_ready
from tests.http.protocols.test_oip import assert_protocol_error, explain_body
from tests.http.test_server import start_server


def instance(data: bytes, **options: object) -> dict:
    return {"image": {"b64": base64.b64encode(data).decode()}, **options}


@pytest.fixture(scope="module")
def make_module_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """Services with some settings changed, kept for the module's tests."""
    opened: list[TestClient] = []

    def factory(**changes: object) -> TestClient:
        client = TestClient(create_app(Settings(**{**settings.model_dump(), **changes})))
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield factory
    for client in opened:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------- the render budget (defect 1)


@pytest.fixture(scope="module")
def small_budget(make_module_client: Callable[..., TestClient]) -> TestClient:
    """A service whose requests may draw 100,000 pixels and 3 maps."""
    return make_module_client(max_render_pixels=100_000, max_render_maps=3)


THREE_LAYERS = "features.0,features.2,features"  # 3 maps and their fusion: 4 maps an image


def test_pictures_over_the_render_budget_are_422_on_the_form_and_jobs(
    small_budget: TestClient,
) -> None:
    fits = {"size": "200", "output": "overlay,heatmap"}  # 2 pictures of 200x160
    assert small_budget.post("/explain", files=files(image_bytes()), data=fits).status_code == 200
    for route in ("/explain", "/jobs"):
        big = {"size": "4096", "output": "overlay,heatmap"}
        response = small_budget.post(route, files=files(image_bytes()), data=big)
        message = assert_error(response, 422, "over_budget")
        assert "CAMSERVE_MAX_RENDER_PIXELS" in message and "smaller size" in message
        assert response.json()["error"]["details"]["limit"] == 100_000
        layers = {"target_layer": THREE_LAYERS, "output": "raw"}
        response = small_budget.post(route, files=files(image_bytes()), data=layers)
        assert "4 maps" in assert_error(response, 422, "over_budget")


def test_pictures_over_the_render_budget_are_422_on_kserve_and_oip(
    small_budget: TestClient,
) -> None:
    url = "/v1/models/tiny:explain"
    body = {"instances": [instance(image_bytes(), size="4096", output="overlay")]}
    message = assert_protocol_error(small_budget.post(url, json=body), 422)
    assert "CAMSERVE_MAX_RENDER_PIXELS" in message
    # Two instances whose options differ: 1 map, and 2 with their fusion; each fits alone.
    body = {
        "instances": [
            instance(image_bytes(seed=1), target_layer=["features.0"], output="raw"),
            instance(image_bytes(seed=2), target_layer=["features.2", "features"], output="raw"),
        ]
    }
    for alone in body["instances"]:
        assert small_budget.post(url, json={"instances": [alone]}).status_code == 200
    assert "4 maps" in assert_protocol_error(small_budget.post(url, json=body), 422)
    oip = explain_body(image_bytes(), outputs=("cam",), target_layer=THREE_LAYERS.split(","))
    message = assert_protocol_error(small_budget.post("/v2/models/tiny/infer", json=oip), 422)
    assert "CAMSERVE_MAX_RENDER_MAPS" in message


def test_the_memory_job_store_caps_results_as_redis_does(
    make_module_client: Callable[..., TestClient],
) -> None:
    client = make_module_client(job_max_result_bytes=64 * 1024)
    big = {"size": "1024", "output": "overlay", "image_format": "png"}
    response = client.post("/jobs", files=files(image_bytes()), data=big)
    message = assert_error(response, 413, "result_too_large")
    assert "CAMSERVE_JOB_MAX_RESULT_BYTES" in message
    small = {"size": "64", "output": "overlay"}
    assert client.post("/jobs", files=files(image_bytes()), data=small).status_code == 202


# ---------------------------------------------------- layers without a 2x2 map (defect 5)


@pytest.mark.parametrize("layer", ["fc", "pool"])
# FullGrad takes no layer at all: its own 422 (tests/http/test_explain_parameters.py).
@pytest.mark.parametrize("method", sorted(m for m, c in METHODS.items() if c.takes_layers))
def test_a_layer_without_a_map_is_422_naming_the_candidates(
    client: TestClient, method: str, layer: str
) -> None:
    form = {"method": method, "target_layer": layer, "output": "raw"}
    for route in ("/explain", "/jobs"):  # a job is refused before its 202
        response = client.post(route, files=files(image_bytes()), data=form)
        message = assert_error(response, 422, "invalid_parameter")
        assert f"'{layer}'" in message and "candidate layers: features.0" in message
        assert response.json()["error"]["details"]["candidate_layers"][-1] == "features"
    body = {"instances": [instance(image_bytes(), method=method, target_layer=layer)]}
    message = assert_protocol_error(client.post("/v1/models/tiny:explain", json=body), 422)
    assert "candidate layers: features.0" in message
    oip = explain_body(image_bytes(), outputs=("cam",), method=method, target_layer=layer)
    message = assert_protocol_error(client.post("/v2/models/tiny/infer", json=oip), 422)
    assert "candidate layers: features.0" in message


# ------------------------------------------ KServe's instances share one forward budget (defect 9)


def test_kserve_instances_with_different_options_share_the_forward_budget(
    make_module_client: Callable[..., TestClient],
) -> None:
    # SSCAM on tiny's 4 channels with 2 samples: 8 forwards an image; the limit is 20.
    client = make_module_client(max_cam_forwards=20)
    options = {"method": "SSCAM", "num_samples": 2, "output": "raw"}
    one = {"instances": [instance(image_bytes(seed=1), seed=1, **options)]}
    assert client.post("/v1/models/tiny:explain", json=one).status_code == 200
    # Each instance alone fits, but their seeds differ: each ran as its own call, unchecked.
    body = {"instances": [instance(image_bytes(seed=s), seed=s, **options) for s in range(3)]}
    message = assert_protocol_error(client.post("/v1/models/tiny:explain", json=body), 422)
    assert "24 forwards together (24 masked or noisy forwards of the methods)" in message
    assert "CAMSERVE_MAX_CAM_FORWARDS" in message and "faithfulness" not in message
    # /explain refuses the same work in one call.
    form = {"method": "SSCAM", "num_samples": "2", "output": "raw"}
    images = files(*(image_bytes(seed=s) for s in range(3)))
    assert_error(client.post("/explain", files=images, data=form), 422, "over_budget")
    # Scoring forwards count in the sum too, and the message names them and their fix (it
    # blamed masked forwards that a gradient method does not run).
    # 2 groups (the methods differ) of 6 images, 2 forwards each: 12 apiece fit, 24 do not.
    body = {
        "instances": [
            instance(image_bytes(seed=s), method=m, output="raw", faithfulness="confidence")
            for m in ("GradCAM", "LayerCAM")
            for s in range(6)
        ]
    }
    message = assert_protocol_error(client.post("/v1/models/tiny:explain", json=body), 422)
    assert "24 forwards together (24 scoring faithfulness)" in message
    assert "masked" not in message
    assert "fewer faithfulness metrics" in message and "num_samples" not in message


# ------------------------------------------------- drawing stops at the drain's cut (defect 1)


def test_sigterm_mid_drawing_answers_json_and_the_server_exits(store: Path) -> None:
    """192 pictures of 1024 px (16 uploads x 6 maps x 2 outputs): tens of seconds of drawing,
    cut by the drain after 1 s of grace. Drawing used to run as one block that the cut could
    not stop: the server exited under it, and the client got a plain-text 500."""
    process, url = start_server(
        store,
        CAMSERVE_SHUTDOWN_GRACE_S="1",
        CAMSERVE_MAX_RENDER_PIXELS=str(10**9),
        CAMSERVE_MAX_RENDER_MAPS="1000",
        CAMSERVE_RENDER_BUDGET_BYTES=str(2 * 1024**3),
    )
    try:
        form = {
            "target_layer": "features.0,features.1,features.2,features.3,features",
            "output": "overlay,heatmap",
            "image_format": "png",
            "size": "1024",
        }
        images = files(*(image_bytes(seed=s) for s in range(16)))
        with httpx.Client(base_url=url, timeout=120) as client:
            answers: list[httpx.Response] = []
            worker = threading.Thread(
                target=lambda: answers.append(client.post("/explain", files=images, data=form))
            )
            worker.start()
            time.sleep(2.0)  # the passes of the tiny model are done by then: it draws
            process.send_signal(signal.SIGTERM)
            worker.join(120)
        (cut,) = answers
        assert cut.status_code == 503, cut.text[:300]
        assert cut.headers["content-type"] == "application/json"
        assert cut.json()["error"]["code"] == "shutting_down"
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in output and "Internal Server Error" not in output
