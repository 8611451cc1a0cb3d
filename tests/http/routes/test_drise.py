"""D-RISE over HTTP: /explain and /jobs explain a box of ``shapes-detect`` (the default store's
detector); a classifier and a segmenter refuse it with a 400 that names the methods to use."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.http.app import create_app
from app.models.zoo.shapes_dataset import make_pairs
from app.settings import Settings
from tests.conftest import assert_error, wait_ready
from tests.fixtures_models import build_tiny, write_model
from tests.fixtures_tasks import copy_shapes_task_models
from tests.http.routes.test_jobs import finished, wait_for

DRISE = {"method": "DRISE", "masks": "60", "seed": "5", "output": "raw"}
BUDGET = 1000
"""The service's CAMSERVE_MAX_CAM_FORWARDS here."""


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    store = tmp_path_factory.mktemp("drise-store")
    copy_shapes_task_models(store)
    torch.manual_seed(0)
    write_model(
        store,
        "tiny",
        build_tiny(),
        architecture="tests.fixtures_models:build_tiny",
        num_classes=3,
        input_size=32,
        target_layers=["features"],
    )
    settings = Settings(
        model_store=store,
        default_model="shapes-detect",
        device="cpu",
        cache_mb=0,
        max_cam_forwards=BUDGET,
    )
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def _scene() -> list[tuple[str, tuple[str, bytes, str]]]:
    images, _, _ = make_pairs(1, 2026, 64)
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    return [("file", ("scene.png", buffer.getvalue(), "image/png"))]


def _peak(raw: dict[str, object]) -> tuple[int, int]:
    cam = np.asarray(raw["values"], dtype=np.float32)
    flat = int(cam.argmax())
    return flat // cam.shape[1], flat % cam.shape[1]


def test_explain_a_box_with_drise(client: TestClient) -> None:
    models = client.get("/models/shapes-detect").json()
    assert "DRISE" in models["methods"]
    response = client.post("/explain", files=_scene(), data={**DRISE, "box": ["0", "1"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "DRISE" and body["options"] == {"masks": 60, "seed": 5}
    explained = body["results"][0]["explanations"]
    assert [e["detection"] for e in explained] == [0, 1]
    for item in explained:
        x0, y0, x1, y1 = item["box"]
        row, col = _peak(item["maps"][0]["raw"])
        assert x0 <= col < x1 and y0 <= row < y1, (item["box"], row, col)
    again = client.post("/explain", files=_scene(), data={**DRISE, "box": ["0", "1"]})
    assert again.json()["results"][0]["explanations"] == explained  # the seed fixes the masks


def test_a_job_explains_a_box_with_drise(client: TestClient) -> None:
    created = client.post("/jobs", files=_scene(), data={**DRISE, "box": "0"})
    assert created.status_code == 202, created.text
    view = wait_for(client, created.json()["id"], finished)
    assert view["status"] == "succeeded", view
    item = view["result"]["results"][0]["explanations"][0]
    assert item["method"] == "DRISE" and item["detection"] == 0


def test_the_boxes_of_an_image_share_its_masked_forwards(client: TestClient) -> None:
    pair = client.post("/explain", files=_scene(), data={**DRISE, "box": ["0", "1"]})
    first = client.post("/explain", files=_scene(), data={**DRISE, "box": "0"})
    second = client.post("/explain", files=_scene(), data={**DRISE, "box": "1"})
    for response in (pair, first, second):
        assert response.status_code == 200, response.text
    # One hooked forward (the answer's too), then 60 masks in chunks of 32: two boxes alike.
    assert pair.json()["timings"]["forwards"] == first.json()["timings"]["forwards"] == 3
    together = pair.json()["results"][0]["explanations"]
    alone = [r.json()["results"][0]["explanations"][0] for r in (first, second)]
    for got, want in zip(together, alone, strict=True):
        assert got["detection"] == want["detection"]
        np.testing.assert_allclose(
            got["maps"][0]["raw"]["values"], want["maps"][0]["raw"]["values"], atol=1e-5
        )


def _cam_forwards(client: TestClient) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "camserve_cam_forwards_total" and sample.labels == {
                "model": "shapes-detect",
                "version": "1",
                "method": "DRISE",
            }:
                return sample.value
    return 0.0


def test_the_masked_forwards_are_counted_in_the_metrics(client: TestClient) -> None:
    before = _cam_forwards(client)
    response = client.post("/explain", files=_scene(), data={**DRISE, "box": ["0", "1"]})
    assert response.status_code == 200, response.text
    assert _cam_forwards(client) - before == 60  # the masks, once for both boxes


def test_drise_counts_against_the_forward_budget(client: TestClient) -> None:
    data = {**DRISE, "masks": str(BUDGET + 1), "box": "0"}
    message = assert_error(client.post("/explain", files=_scene(), data=data), 422, "over_budget")
    assert f"DRISE would run {BUDGET + 1}" in message and "CAMSERVE_MAX_CAM_FORWARDS" in message
    two = _scene() + [("file", ("again.png", _scene()[0][1][1], "image/png"))]
    data = {**DRISE, "masks": str(BUDGET // 2 + 1), "box": "0"}
    message = assert_error(client.post("/explain", files=two, data=data), 422, "over_budget")
    assert f"DRISE would run {2 * (BUDGET // 2 + 1)}" in message


def test_every_box_of_an_image_costs_its_masks_once(client: TestClient) -> None:
    # box=all asks for up to 10 boxes: priced once per image, as they run, not once per box.
    data = {**DRISE, "masks": str(BUDGET // 2), "box": "all"}
    response = client.post("/explain", files=_scene(), data=data)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["explanations"]) == 2


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("tiny", "DRISE explains a detector's boxes"),
        ("shapes-segment", "DRISE cannot explain a segmentation model"),
    ],
)
def test_drise_on_a_classifier_or_segmenter_is_a_400(
    client: TestClient, model: str, words: str
) -> None:
    data = {"model": model, "method": "DRISE"}
    if model == "shapes-segment":
        data["class_idx"] = "1"
    message = assert_error(
        client.post("/explain", files=_scene(), data=data), 400, "invalid_target"
    )
    assert words in message
    described = client.get(f"/models/{model}").json()
    assert "DRISE" not in described["methods"]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("masks", "0", "DRISE: masks must lie in [1, 20000]"),
        ("grid", "65", "DRISE: grid must lie in [2, 64]"),
        ("keep", "1", "DRISE: keep must lie in [0.05, 0.95]"),
        ("aug_smooth", "true", "DRISE does not take the option 'aug_smooth'"),
    ],
)
def test_drise_options_out_of_bounds_are_a_422(
    client: TestClient, option: str, value: str, words: str
) -> None:
    data = {"method": "DRISE", option: value}
    message = assert_error(
        client.post("/explain", files=_scene(), data=data), 422, "invalid_parameter"
    )
    assert message.startswith(words), message


def test_the_model_page_says_drise_is_slow(client: TestClient) -> None:
    info = client.get("/models/shapes-detect").json()["method_info"]["DRISE"]
    assert info["slow"] and info["forwards"] == 1000
    assert info["summary"].startswith("D-RISE (Petsiuk et al., CVPR 2021")
